//! Running as a service, end to end with the real binaries: config files
//! (the examples under deploy/ among them), `--check-config`, the fient
//! daemon's control socket (`fient status`), its shared-memory clock and
//! its drift file, and `cerv status`.

use lab::certs::TestCerts;
use lab::harness::{Cerv, bin, json, run};
use lab::peers::TempDir;
use service::shm::ShmReader;
use service::synced::Status;
use service::time::Timestamp;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn check(program: &str, config: &Path) -> lab::harness::Finished {
    run(
        Command::new(bin(program))
            .arg("--config")
            .arg(config)
            .arg("--check-config"),
        Duration::from_secs(20),
    )
}

#[test]
fn every_example_config_validates() {
    let out = check("cerv", &repo("deploy/cerv.toml"));
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("the configuration is valid"),
        "{}",
        out.stdout
    );
    let out = check("fient", &repo("deploy/fient.toml"));
    assert_eq!(out.code(), Some(0), "{}", out.stderr);

    // The NTS example names certificate files under /etc: the check loads
    // them, so it fails here as it should, naming the file and the line ...
    let out = check("cerv", &repo("deploy/cerv-nts.toml"));
    assert_eq!(out.code(), Some(2), "{}", out.stdout);
    assert!(
        out.stderr.contains("/etc/cerv/cert.pem") && out.stderr.contains("cerv-nts.toml line"),
        "{}",
        out.stderr
    );
    // ... and passes with real certificates in their place.
    let certs = TestCerts::generate();
    let text = std::fs::read_to_string(repo("deploy/cerv-nts.toml"))
        .unwrap()
        .replace("/etc/cerv/cert.pem", certs.good.cert.to_str().unwrap())
        .replace("/etc/cerv/key.pem", certs.good.key.to_str().unwrap());
    let dir = TempDir::new("cerv-config");
    let local = dir.path().join("cerv-nts.toml");
    std::fs::write(&local, text).unwrap();
    let out = check("cerv", &local);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
}

#[test]
fn a_bad_config_names_the_file_the_line_and_the_key() {
    let dir = TempDir::new("cerv-config");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    for (program, name, text, needle) in [
        (
            "cerv",
            "typo.toml",
            "listen = \"127.0.0.1:0\"\nrate_limit = 5\n",
            "typo.toml:2: unknown key 'rate_limit' (did you mean 'rate-limit'?)",
        ),
        (
            "cerv",
            "value.toml",
            "\nntp-stratum = 99\n",
            "value.toml:2: key 'ntp-stratum'",
        ),
        (
            "cerv",
            "addr.toml",
            "ntp-listen = [\"127.0.0.1:99999\"]\n",
            "invalid --ntp-listen address '127.0.0.1:99999'",
        ),
        ("cerv", "syntax.toml", "listen = \n", "syntax.toml"),
        (
            "fient",
            "servers.toml",
            "servers = [\"127.0.0.1:8081\", \"gopher://x\"]\nwatch = \"1s\"\n",
            "gopher",
        ),
        (
            "fient",
            "flag.toml",
            "json = \"yes\"\n",
            "flag.toml:1: key 'json': expected true or false",
        ),
        ("fient", "range.toml", "\n\nmax-drift = 5000\n", "(set in "),
    ] {
        let path = write(name, text);
        let out = check(program, &path);
        assert_eq!(out.code(), Some(2), "{name}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(needle), "{name}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
    }
    let out = check("cerv", &dir.path().join("missing.toml"));
    assert_eq!(out.code(), Some(2));
    assert!(
        out.stderr.contains("cannot read config file"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_command_line_wins_over_the_file() {
    let server = Cerv::start(&[]);
    let dir = TempDir::new("fient-config");
    let path = dir.path().join("fient.toml");
    // The file names a server that is not there and one probe; the command
    // line names the real one.
    std::fs::write(
        &path,
        "servers = [\"127.0.0.1:9\"]\nprobes = 2\njson = true\n",
    )
    .unwrap();
    let out = run(
        Command::new(bin("fient"))
            .arg("--config")
            .arg(&path)
            .arg(server.target()),
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let report = json(&out.stdout);
    assert_eq!(report["server"], server.target());
    assert_eq!(
        report["samples_used"].as_u64(),
        Some(2),
        "probes from the file"
    );
}

/// A fient daemon, stopped with SIGTERM (and killed if it will not go,
/// or if the test fails first).
struct Daemon(lab::harness::Spawned);

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        Daemon(lab::harness::spawn(Command::new(bin("fient")).args(args)))
    }

    /// SIGTERM, then its exit code and stderr.
    fn stop(self) -> (Option<i32>, String) {
        let out = self.0.stop(Duration::from_secs(10));
        (out.code(), out.stderr)
    }
}

fn status(program: &str, socket: &Path) -> lab::harness::Finished {
    run(
        Command::new(bin(program))
            .args(["status", "--json", "--socket"])
            .arg(socket),
        Duration::from_secs(10),
    )
}

/// Asks until `ready` holds for the JSON status (at most 15 s).
fn wait_for_status(
    program: &str,
    socket: &Path,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = status(program, socket);
        if out.code() == Some(0) {
            let v = json(&out.stdout);
            if ready(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{program} status never got there: {}{}",
            out.stdout,
            out.stderr
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemon_answers_status_publishes_the_clock_and_keeps_its_drift() {
    let server = Cerv::start(&["--ntp-listen", "127.0.0.1:0", "--ntp-stratum", "3"]);
    let cerv_dir = TempDir::new("cerv-ctl");
    let cerv_socket = cerv_dir.path().join("cerv.sock");
    let second = Cerv::start(&["--control-socket", cerv_socket.to_str().unwrap()]);
    let dir = TempDir::new("fient-daemon");
    let socket = dir.path().join("fient.sock");
    let shm = dir.path().join("clock");
    let drift = dir.path().join("drift");
    let config = dir.path().join("fient.toml");
    std::fs::write(
        &config,
        format!(
            "servers = [\"{}\", \"{}\", \"127.0.0.1:9\"]\nwatch = \"300ms\"\nprobes = 3\ntimeout = \"200ms\"\n\
             control-socket = \"{}\"\nshm = \"{}\"\ndrift-file = \"{}\"\n",
            server.ntp_target(),
            second.target(),
            socket.display(),
            shm.display(),
            drift.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&["--config", config.to_str().unwrap()]);

    // The tracking view, once a few rounds are in and the filter has a
    // frequency.
    let v = wait_for_status("fient", &socket, |v| {
        v["tracking"]["frequency_ppm"].is_number()
            && v["syncs"]["synced"].as_u64().unwrap_or(0) >= 3
    });
    let t = &v["tracking"];
    assert_eq!(t["agreeing"], 2, "{v:#}");
    assert_eq!(t["answered"], 2);
    assert_eq!(t["stratum"], 4, "one above the NTP source's 3");
    assert_eq!(t["leap"], "normal");
    assert_eq!(t["frequency_from"], "filter");
    // Both servers run on this host's clock: the truth is an offset of 0.
    let (offset, bound) = (
        t["offset_ns"].as_i64().unwrap(),
        t["bound_ns"].as_i64().unwrap(),
    );
    assert!(offset.abs() <= bound, "{t:#}");
    assert!(t["bound_now_ns"].as_i64().unwrap() >= bound);
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 3);
    assert_eq!(sources[0]["wire"], "ntp");
    assert_eq!(sources[0]["stratum"], 3);
    assert_eq!(sources[1]["wire"], "cerv");
    for s in &sources[..2] {
        assert!(
            ["selected", "agrees"].contains(&s["status"].as_str().unwrap()),
            "{s}"
        );
        assert_eq!(
            s["reach"].as_u64().unwrap() & 0b111,
            0b111,
            "answered the last 3: {s}"
        );
        assert!(s["rtt_ns"].as_i64().unwrap() > 0);
    }
    assert_eq!(sources[2]["status"], "no_answer");
    assert_eq!(sources[2]["reach"], 0);
    assert!(
        sources[2]["error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:9")
    );

    // The human view says the same.
    let human = run(
        Command::new(bin("fient"))
            .args(["status", "--socket"])
            .arg(&socket),
        Duration::from_secs(10),
    );
    assert_eq!(human.code(), Some(0), "{}", human.stderr);
    for want in [
        "Reference       :",
        "(2 of 2 agree)",
        "Stratum         : 4",
        "no answer",
        "REACH",
    ] {
        assert!(
            human.stdout.contains(want),
            "missing {want:?}:\n{}",
            human.stdout
        );
    }

    // Every process on the host reads an honest interval from the segment,
    // without asking anyone: it holds this clock (the truth here).
    let reader = ShmReader::open(&shm).unwrap();
    let before = Timestamp::from_nanos(read_realtime());
    let now = reader.now().unwrap();
    let after = Timestamp::from_nanos(read_realtime());
    assert_eq!(now.status, Status::Synchronized);
    assert!(
        now.earliest <= after && before <= now.latest,
        "{now:?} vs [{before}, {after}]"
    );
    let width = now.latest.as_nanos() - now.earliest.as_nanos();
    assert!(
        width < 10_000_000,
        "a tight interval on loopback: {width} ns"
    );

    // cerv status, from the second server, counts fient's requests.
    let c = wait_for_status("cerv", &cerv_socket, |c| {
        c["faces"][0]["replied"].as_u64() >= Some(3)
    });
    assert_eq!(c["faces"][0]["wire"], "cerv");
    assert_eq!(c["faces"][0]["address"], second.target());
    // fient's status against cerv's socket is a usage error, said plainly.
    let wrong = run(
        Command::new(bin("fient"))
            .args(["status", "--socket"])
            .arg(&cerv_socket),
        Duration::from_secs(10),
    );
    assert_eq!(wrong.code(), Some(2));
    assert!(wrong.stderr.contains("cerv status"), "{}", wrong.stderr);

    // SIGTERM: a clean exit, the socket gone, the segment marked stale (its
    // interval still honest), the drift file written.
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!socket.exists(), "the control socket is removed at exit");
    let after_exit = reader.now().unwrap();
    assert_eq!(after_exit.status, Status::Stale);
    let saved = std::fs::read_to_string(&drift).unwrap();
    let mut figures = saved.split_whitespace();
    let freq: f64 = figures.next().unwrap().parse().unwrap();
    let unc: f64 = figures.next().unwrap().parse().unwrap();
    assert!(freq.abs() < 500.0 && unc >= 0.0, "{saved}");
    let out = status("fient", &socket);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("no fient daemon at"), "{}", out.stderr);

    // Restarted, the frequency is known at once, from the drift file.
    let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--watch", "5s"]);
    let v = wait_for_status("fient", &socket, |v| v["tracking"].is_object());
    assert_eq!(v["tracking"]["frequency_from"], "drift_file", "{v:#}");
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");

    // A bad drift file is a warning and a fresh start, not a failure.
    std::fs::write(&drift, "fast\n").unwrap();
    let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--watch", "5s"]);
    let v = wait_for_status("fient", &socket, |v| v["tracking"].is_object());
    assert!(v["tracking"]["frequency_from"].is_null(), "{v:#}");
    let (code, stderr) = daemon.stop();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("ignoring drift file"), "{stderr}");
}

#[test]
fn a_second_daemon_on_the_same_socket_or_segment_is_refused() {
    let server = Cerv::start(&[]);
    let dir = TempDir::new("fient-twice");
    let socket = dir.path().join("fient.sock");
    let shm = dir.path().join("clock");
    let first = Daemon::start(&[
        &server.target(),
        "--watch",
        "1s",
        "--control-socket",
        socket.to_str().unwrap(),
        "--shm",
        shm.to_str().unwrap(),
    ]);
    wait_for_status("fient", &socket, |v| v["tracking"].is_object());
    let out = run(
        Command::new(bin("fient"))
            .args([
                &server.target(),
                "--watch",
                "1s",
                "--count",
                "1",
                "--control-socket",
            ])
            .arg(&socket),
        Duration::from_secs(10),
    );
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("another daemon is answering on it"),
        "{}",
        out.stderr
    );
    let other = dir.path().join("other.sock");
    let out = run(
        Command::new(bin("fient"))
            .args([&server.target(), "--watch", "1s", "--count", "1", "--shm"])
            .arg(&shm)
            .arg("--control-socket")
            .arg(&other),
        Duration::from_secs(10),
    );
    assert_ne!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("already has a writer"),
        "{}",
        out.stderr
    );
    let (code, stderr) = first.stop();
    assert_eq!(code, Some(0), "{stderr}");
}

fn read_realtime() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// SIGHUP reads the certificate again: new handshakes get the new one, a
/// connection already open goes on being served, and a bad file keeps the
/// pair in use (counted in `cerv status`).
#[test]
fn a_hangup_swaps_the_certificate_without_dropping_a_client() {
    let certs = TestCerts::generate();
    let dir = TempDir::new("cerv-reload");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&certs.good.cert, &cert).unwrap();
    std::fs::copy(&certs.good.key, &key).unwrap();
    let socket = dir.path().join("cerv.sock");
    let server = Cerv::start(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    let target = server.tls_target();
    let ca = certs.ca.to_str().unwrap().to_string();
    let one_shot = || {
        run(
            Command::new(bin("fient")).args([&target, "--ca", &ca, "-n", "2"]),
            Duration::from_secs(20),
        )
    };
    let out = one_shot();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = service::tls::client_config(Some(&certs.ca), &[], false).unwrap();
    let tls_addr = server.stream_addr(service::source::Wire::Tls);
    let client = runtime.block_on(async {
        let transport = service::transport::stream::connect_tls(tls_addr, "localhost", config)
            .await
            .expect("a TLS connection before the reload");
        service::TimeServiceClient::new(service::transport::client::client_config(), transport)
            .spawn()
    });
    let probe = |client: &service::TimeServiceClient| {
        runtime.block_on(client.probe(tarpc::context::current(), Timestamp::EPOCH))
    };
    probe(&client).expect("served before the reload");

    // A renewal for the wrong name: after SIGHUP, new handshakes get it.
    std::fs::copy(&certs.wrong_name.cert, &cert).unwrap();
    std::fs::copy(&certs.wrong_name.key, &key).unwrap();
    let hangup = || {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGHUP) };
    };
    hangup();
    let c = wait_for_status("cerv", &socket, |c| c["reloads"] == 1);
    assert_eq!(c["reload_failures"], 0);
    let out = one_shot();
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("elsewhere.example"),
        "the new certificate: {}",
        out.stderr
    );
    // The connection opened before goes on.
    probe(&client).expect("still served after the reload");

    // A half-written file: the reload fails, the pair in use stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    hangup();
    let c = wait_for_status("cerv", &socket, |c| c["reload_failures"] == 1);
    assert_eq!(c["reloads"], 1);
    let out = one_shot();
    assert!(
        out.stderr.contains("elsewhere.example"),
        "still the last good one: {}",
        out.stderr
    );
    std::fs::copy(&certs.good.cert, &cert).unwrap();
    std::fs::copy(&certs.good.key, &key).unwrap();
    hangup();
    wait_for_status("cerv", &socket, |c| c["reloads"] == 2);
    let out = one_shot();
    assert_eq!(out.code(), Some(0), "back to the good one: {}", out.stderr);
    probe(&client).expect("and the first connection still served");
    let (status, log) = server.stop();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(log.contains("SIGHUP: reloaded"), "{log}");
    assert!(log.contains("still using what was loaded before"), "{log}");
}
