//! `cerv-bench`: how fast is cerv, against the fastest this machine can do?
//!
//! Every figure is a ratio to a bare UDP echo server measured in the same
//! run, by the same load generator, with the same datagrams: the ceiling
//! for any request-reply service here. Runs alternate echo and cerv, and
//! the medians of the per-run ratios are reported, so a noisy machine
//! shifts both sides alike.
//!
//! ```text
//! cargo run --release --bin cerv-bench               # everything, 5 runs of 5 s
//! cargo run --release --bin cerv-bench -- --only throughput --runs 3 --duration 3s
//! cargo run --release --bin cerv-bench -- --only ntp     # plain NTP against NTS
//! ```

use clap::{Parser, ValueEnum};
use lab::accuracy::median;
use lab::load::{self, EchoServer, LoadConfig, LoadReport, Target};
use lab::{Cerv, bin, run};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// Load benchmark of cerv against a UDP echo server.
#[derive(Parser, Debug)]
#[command(name = "cerv-bench")]
struct Args {
    /// Measured runs of each kind (each run: echo, then cerv).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Length of each run (at most 60 s).
    #[arg(long, default_value = "5s")]
    duration: service::Nanos,
    /// Requests in flight for the throughput runs.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Client sockets (each its own thread) for the throughput runs.
    #[arg(long, default_value_t = 1)]
    sockets: usize,
    /// Distinct client addresses for the memory run.
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    /// Spoofed source addresses for the spoofing run.
    #[arg(long, default_value_t = 100_000)]
    spoofed: u32,
    /// fient processes for the one-shot timing.
    #[arg(long, default_value_t = 50)]
    fient_runs: usize,
    /// Only this part.
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Load a cerv that is already running (for profiling it) instead of
    /// starting one; only the throughput and latency parts apply.
    #[arg(long, value_name = "ADDR")]
    server: Option<SocketAddr>,
    /// What `--server` speaks: cerv's wire, NTP (its --ntp-listen
    /// address), or nothing of its own (an echo server: the requests come
    /// back as they went).
    #[arg(long, value_enum, default_value = "cerv", requires = "server")]
    server_wire: ServerWire,
    /// Leave the generator and the servers to the scheduler instead of
    /// pinning them to separate CPUs (for a before-and-after).
    #[arg(long)]
    no_pin: bool,
    /// Extra arguments for cerv.
    #[arg(last = true)]
    cerv_args: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ServerWire {
    Cerv,
    Ntp,
    Echo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Throughput,
    Latency,
    Fient,
    Memory,
    Flood,
    Spoof,
    /// cerv's NTP face, plain and with NTS, beside echo.
    Ntp,
}

fn describe(name: &str, r: &LoadReport) -> String {
    format!(
        "{name:>10}: {:>9.0} replies/s, lost {:>5}, invalid {}, rtt p50 {:>6.1} µs, p99 {:>7.1} µs, p99.9 {:>7.1} µs",
        r.rate(),
        r.lost,
        r.invalid,
        r.rtt_us(0.50),
        r.rtt_us(0.99),
        r.rtt_us(0.999)
    )
}

/// Where the two sides of a measurement run: the generator on one CPU,
/// every server (cerv, echo, chronyd) on another, so that they never
/// queue for the same core and the generator is never slowed by the
/// server it measures.
#[derive(Clone, Copy, Debug)]
struct Pins {
    generator: usize,
    server: usize,
}

impl Pins {
    /// Pins the calling thread (and so the generator threads it starts)
    /// to the first allowed CPU; servers go to the last. None on one CPU.
    fn new() -> Option<Pins> {
        let cpus = load::allowed_cpus();
        let (&generator, &server) = (cpus.first()?, cpus.last()?);
        (generator != server && load::pin_thread(generator).is_ok())
            .then_some(Pins { generator, server })
    }

    fn server(pins: Option<Pins>, pid: u32) {
        if let Some(p) = pins
            && let Err(e) = load::pin_process(pid, p.server)
        {
            eprintln!(
                "cerv-bench: cannot pin process {pid} to CPU {}: {e}",
                p.server
            );
        }
    }

    fn describe(pins: Option<Pins>) -> String {
        pins.map_or_else(
            || "generator and servers unpinned".to_string(),
            |p| {
                format!(
                    "generator on CPU {}, servers on CPU {}",
                    p.generator, p.server
                )
            },
        )
    }
}

/// One run of echo, the stamped echo, cerv's own wire and cerv's NTP
/// face, in turn.
struct Round {
    echo: LoadReport,
    stamped: LoadReport,
    cerv: LoadReport,
    ntp: LoadReport,
}

/// The two echo servers: the bare one (the ceiling for any request-reply
/// service) and one that also has the kernel stamp every arrival (the
/// ceiling for a time server, which needs those stamps).
struct Echoes {
    bare: EchoServer,
    stamped: EchoServer,
}

/// Alternating echo, stamped echo, cerv and cerv NTP runs.
fn compare(cerv: &Cerv, echoes: &Echoes, config: LoadConfig, runs: usize) -> Vec<Round> {
    (0..runs)
        .map(|i| {
            let round = Round {
                echo: load::run(echoes.bare.addr(), Target::Echo, config).expect("echo run"),
                stamped: load::run(echoes.stamped.addr(), Target::Echo, config)
                    .expect("stamped echo run"),
                cerv: load::run(cerv.addr, Target::Cerv, config).expect("cerv run"),
                ntp: load::run(cerv.ntp_addrs[0], Target::Ntp, config).expect("cerv ntp run"),
            };
            println!("run {}:", i + 1);
            println!("  {}", describe("echo", &round.echo));
            println!("  {}", describe("stamped", &round.stamped));
            println!("  {}", describe("cerv", &round.cerv));
            println!("  {}", describe("cerv ntp", &round.ntp));
            round
        })
        .collect()
}

/// Median of a ratio over the rounds, as a fixed-point integer so
/// `median` can sort it.
fn median_ratio(rounds: &[Round], f: impl Fn(&Round) -> f64) -> f64 {
    let scaled: Vec<i64> = rounds.iter().map(|r| (f(r) * 1e4) as i64).collect();
    median(&scaled).unwrap_or(0) as f64 / 1e4
}

fn main() {
    let args = Args::parse();
    let duration = args.duration.unsigned_duration().min(load::MAX_DURATION);
    let wants = |p: Part| args.only.is_none_or(|o| o == p);
    let cerv_args: Vec<&str> = args.cerv_args.iter().map(String::as_str).collect();
    let cores = load::allowed_cpus().len();
    let pins = if args.no_pin { None } else { Pins::new() };
    let echoes = Echoes {
        bare: EchoServer::start(pins.map(|p| p.server)).expect("echo server"),
        stamped: EchoServer::start_stamped(pins.map(|p| p.server)).expect("stamped echo server"),
    };
    let echo = &echoes.bare;
    if let Some(addr) = args.server {
        let config = LoadConfig {
            window: if args.only == Some(Part::Latency) {
                1
            } else {
                args.window
            },
            sockets: args.sockets,
            duration,
            timeout: Duration::from_millis(200),
            pace: Duration::ZERO,
            spin: pins.is_some(),
        };
        let (name, target) = match args.server_wire {
            ServerWire::Cerv => ("cerv", Target::Cerv),
            ServerWire::Ntp => ("cerv ntp", Target::Ntp),
            ServerWire::Echo => ("echo", Target::Echo),
        };
        for _ in 0..args.runs {
            let r = load::run(addr, target.clone(), config).expect("load");
            println!("{}", describe(name, &r));
        }
        return;
    }
    // The load generator is one client asking as fast as it can: rate
    // limiting would measure the limiter, not the server.
    let mut cerv_args = cerv_args;
    if !cerv_args.iter().any(|a| a.starts_with("--rate-limit")) {
        cerv_args.extend(["--rate-limit", "0"]);
    }
    if !cerv_args.contains(&"--ntp-listen") {
        cerv_args.extend(["--ntp-listen", "127.0.0.1:0", "--ntp-stratum", "1"]);
    }
    let cerv = Cerv::start(&cerv_args);
    Pins::server(pins, cerv.pid());
    println!(
        "cerv {} (NTP {}) vs echo {}, {} cores, {}",
        cerv.addr,
        cerv.ntp_addrs[0],
        echo.addr(),
        cores,
        Pins::describe(pins)
    );

    // The throughput runs' load: the window in flight, as fast as it goes.
    let throughput = LoadConfig {
        window: args.window,
        sockets: args.sockets,
        duration,
        timeout: Duration::from_millis(200),
        pace: Duration::ZERO,
        spin: pins.is_some(),
    };
    if wants(Part::Throughput) {
        let config = throughput;
        println!(
            "\n## throughput: window {}, {} socket(s), {:?} per run",
            config.window, config.sockets, duration
        );
        let rounds = compare(&cerv, &echoes, config, args.runs);
        println!(
            "median throughput ratios: cerv/echo {:.3}, cerv ntp/echo {:.3}",
            median_ratio(&rounds, |r| r.cerv.rate() / r.echo.rate()),
            median_ratio(&rounds, |r| r.ntp.rate() / r.echo.rate())
        );
        println!(
            "against the stamped echo: stamped/echo {:.3}, cerv/stamped {:.3}, cerv ntp/stamped {:.3}",
            median_ratio(&rounds, |r| r.stamped.rate() / r.echo.rate()),
            median_ratio(&rounds, |r| r.cerv.rate() / r.stamped.rate()),
            median_ratio(&rounds, |r| r.ntp.rate() / r.stamped.rate())
        );
    }

    if wants(Part::Latency) {
        let config = LoadConfig {
            window: 1,
            sockets: 1,
            duration,
            timeout: Duration::from_millis(200),
            pace: Duration::ZERO,
            spin: pins.is_some(),
        };
        println!("\n## latency: window 1, {duration:?} per run");
        let rounds = compare(&cerv, &echoes, config, args.runs);
        println!(
            "median p50 latency ratios: cerv/echo {:.3}, cerv ntp/echo {:.3}",
            median_ratio(&rounds, |r| r.cerv.rtt_us(0.5) / r.echo.rtt_us(0.5)),
            median_ratio(&rounds, |r| r.ntp.rtt_us(0.5) / r.echo.rtt_us(0.5))
        );
        println!(
            "against the stamped echo: stamped/echo {:.3}, cerv/stamped {:.3}, cerv ntp/stamped {:.3}",
            median_ratio(&rounds, |r| r.stamped.rtt_us(0.5) / r.echo.rtt_us(0.5)),
            median_ratio(&rounds, |r| r.cerv.rtt_us(0.5) / r.stamped.rtt_us(0.5)),
            median_ratio(&rounds, |r| r.ntp.rtt_us(0.5) / r.stamped.rtt_us(0.5))
        );
    }

    if wants(Part::Fient) {
        println!(
            "\n## fient one-shot: {} runs, 5 probes, whole process",
            args.fient_runs
        );
        let fient = bin("fient");
        let mut walls = Vec::new();
        let mut failed = 0;
        for _ in 0..args.fient_runs {
            let out = run(
                Command::new(&fient).arg(cerv.target()).arg("--json"),
                Duration::from_secs(10),
            );
            if out.code() == Some(0) {
                walls.push(out.elapsed);
            } else {
                failed += 1;
            }
        }
        walls.sort();
        let pct = |q: f64| {
            walls
                .get(((walls.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "fient wall time: median {:.2} ms, p90 {:.2} ms, max {:.2} ms, failed {failed}",
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.9).as_secs_f64() * 1e3,
            pct(1.0).as_secs_f64() * 1e3,
        );
    }

    if wants(Part::Memory) {
        println!("\n## memory: {} distinct client addresses", args.peers);
        let before = load::rss_kib(cerv.pid()).unwrap_or(0);
        let answered =
            load::many_peers(cerv.addr, args.peers, Duration::from_millis(100)).expect("peers");
        let after = load::rss_kib(cerv.pid()).unwrap_or(0);
        let peak = load::peak_rss_kib(cerv.pid()).unwrap_or(0);
        println!(
            "cerv RSS: {:.1} MiB before, {:.1} MiB after, peak {:.1} MiB; {answered}/{} answered",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            peak as f64 / 1024.0,
            args.peers
        );
    }
    let (_, log) = cerv.stop();
    if let Some(line) = log.lines().find(|l| l.contains("server stopped")) {
        println!("\ncerv: {}", line.split("stats=").nth(1).unwrap_or(line));
    }

    // The hardening parts run against a cerv with its default limits.
    if wants(Part::Flood) {
        flood_part(duration, args.runs, &args.cerv_args);
    }
    if wants(Part::Spoof) {
        spoof_part(args.spoofed, &args.cerv_args);
    }
    if wants(Part::Ntp) {
        ntp_part(throughput, args.runs, echo, pins, &args.cerv_args);
    }
}

/// Throughput of cerv's NTP port with plain NTP and with NTS, beside echo
/// and (when this machine has it) a `chronyd -x` serving both on the same
/// certificate, in alternating runs: NTS costs a server an AEAD opening of
/// the cookie, a check of the authenticator, a fresh cookie and a sealed
/// reply.
fn ntp_part(
    config: LoadConfig,
    runs: usize,
    echo: &EchoServer,
    pins: Option<Pins>,
    cerv_args: &[String],
) {
    let certs = lab::certs::TestCerts::generate();
    let (cert, key) = (
        certs.good.cert.display().to_string(),
        certs.good.key.display().to_string(),
    );
    let args: Vec<&str> = cerv_args.iter().map(String::as_str).collect();
    let cerv = Cerv::start_nts(&certs, &args);
    let ke = cerv.stream_addr(service::source::Wire::Nts);
    let credentials = load::nts_credentials(ke, &certs.ca).expect("NTS key exchange with cerv");
    let ntp = cerv.ntp_addrs[0];
    assert_eq!(
        credentials.ntp, ntp,
        "the key exchange names cerv's NTP port"
    );
    // chronyd on the same certificate, never touching the clock.
    let chrony = lab::peers::Peer::Chronyd.find().map(|chronyd| {
        let port = lab::peers::free_udp_port("127.0.0.1");
        let ke_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = format!(
            "port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 1\nacquisitionport 0\nntsserverkey {key}\nntsservercert {cert}\nntsport {ke_port}\n"
        );
        let daemon = lab::peers::Chronyd::start(&chronyd, None, &conf, &[]);
        let ke = SocketAddr::from(([127, 0, 0, 1], ke_port));
        let started = std::time::Instant::now();
        let credentials = loop {
            match load::nts_credentials(ke, &certs.ca) {
                Ok(c) => break c,
                Err(e) if started.elapsed() > Duration::from_secs(10) => {
                    panic!("NTS key exchange with chronyd: {e}\n{}", daemon.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        (daemon, credentials)
    });
    Pins::server(pins, cerv.pid());
    if let Some((daemon, _)) = &chrony {
        Pins::server(pins, daemon.pid());
    }
    println!(
        "\n## ntp: plain NTP and NTS to cerv {ntp}{}, {}, window {}, {} socket(s), {:?} per run",
        chrony
            .as_ref()
            .map(|(_, c)| format!(" and chronyd {}", c.ntp))
            .unwrap_or_else(|| " (no chronyd here: .ci/peers unpacks one)".into()),
        Pins::describe(pins),
        config.window,
        config.sockets,
        config.duration
    );
    // Per run: echo, cerv NTP, cerv NTS, chronyd NTP, chronyd NTS; the
    // replies per second, and the server's CPU time per reply. On a
    // machine of two cores the generator holds one, so a server may be
    // held back by it rather than by its own work: the CPU time per reply
    // is what a server saturated by clients would be limited by.
    let mut rates: Vec<[f64; 5]> = Vec::new();
    let mut costs: Vec<[f64; 5]> = Vec::new();
    let chrony_pid = chrony.as_ref().map(|(d, _)| d.pid());
    for i in 0..runs {
        let mut row = [f64::NAN; 5];
        let mut cost = [f64::NAN; 5];
        let mut loads: Vec<(&str, SocketAddr, Target, Option<u32>)> = vec![
            ("echo", echo.addr(), Target::Echo, None),
            ("cerv ntp", ntp, Target::Ntp, Some(cerv.pid())),
            (
                "cerv nts",
                ntp,
                Target::Nts(credentials.clone()),
                Some(cerv.pid()),
            ),
        ];
        if let Some((_, c)) = &chrony {
            loads.push(("chrony ntp", c.ntp, Target::Ntp, chrony_pid));
            loads.push(("chrony nts", c.ntp, Target::Nts(c.clone()), chrony_pid));
        }
        println!("run {}:", i + 1);
        for (k, (name, addr, target, pid)) in loads.into_iter().enumerate() {
            let before = pid.and_then(load::process_cpu);
            let r = load::run(addr, target, config).expect("load run");
            let used = pid
                .and_then(load::process_cpu)
                .zip(before)
                .map(|(a, b)| a.saturating_sub(b));
            // The whole run, warm-up included, against every reply.
            let replies = r.rate() * (config.duration.as_secs_f64() + 0.2);
            let us = used.map_or(f64::NAN, |u| u.as_secs_f64() * 1e6 / replies.max(1.0));
            println!("  {}, server CPU {us:.2} µs/reply", describe(name, &r));
            row[k] = r.rate();
            cost[k] = us;
        }
        rates.push(row);
        costs.push(cost);
    }
    let ratio_of = |table: &[[f64; 5]], a: usize, b: usize| {
        let v: Vec<i64> = table
            .iter()
            .filter(|r| r[a].is_finite() && r[b].is_finite() && r[b] > 0.0)
            .map(|r| (r[a] / r[b] * 1e4) as i64)
            .collect();
        median(&v).map(|m| m as f64 / 1e4)
    };
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let ratio = |a, b| show(ratio_of(&rates, a, b));
    // Capacity ratio: the CPU per reply of b over that of a.
    let capacity = |a, b| show(ratio_of(&costs, b, a));
    println!(
        "median throughput ratios: cerv ntp/echo {}, cerv nts/echo {}, cerv nts/ntp {}",
        ratio(1, 0),
        ratio(2, 0),
        ratio(2, 1)
    );
    println!(
        "median capacity ratios (server CPU per reply): cerv nts/ntp {}",
        capacity(2, 1)
    );
    if chrony.is_some() {
        println!(
            "against chronyd: throughput cerv ntp/chrony ntp {}, cerv nts/chrony nts {}, chrony nts/ntp {}",
            ratio(1, 3),
            ratio(2, 4),
            ratio(4, 3)
        );
        println!(
            "against chronyd: capacity cerv ntp/chrony ntp {}, cerv nts/chrony nts {}, chrony nts/ntp {}",
            capacity(1, 3),
            capacity(2, 4),
            capacity(4, 3)
        );
    }
    let (_, log) = cerv.stop();
    if let Some(line) = log.lines().find(|l| l.contains("server stopped")) {
        println!("cerv: {}", line.split("stats=").nth(1).unwrap_or(line));
    }
}

/// A client's latency at window 1, idle and while one other address
/// floods the server (with cerv's default rate limit).
fn flood_part(duration: Duration, runs: usize, cerv_args: &[String]) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let args: Vec<&str> = cerv_args.iter().map(String::as_str).collect();
    let cerv = Cerv::start(&args);
    // 50 requests a second: an honest client, well under the limit.
    let config = LoadConfig {
        window: 1,
        sockets: 1,
        duration,
        timeout: Duration::from_millis(200),
        pace: Duration::from_millis(20),
        spin: false,
    };
    println!(
        "\n## flood: a client asking 50 times a second, idle and while 127.0.0.2 floods ({duration:?} per run)"
    );
    let mut ratios = Vec::new();
    for i in 0..runs {
        let idle = load::run(cerv.addr, Target::Cerv, config).expect("idle run");
        let stop = Arc::new(AtomicBool::new(false));
        let flooder = {
            let (stop, target) = (stop.clone(), cerv.addr);
            std::thread::spawn(move || {
                load::flood(
                    target,
                    "127.0.0.2".parse().expect("ip"),
                    &stop,
                    load::MAX_DURATION,
                )
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        let flooded = load::run(cerv.addr, Target::Cerv, config).expect("flooded run");
        stop.store(true, Ordering::Relaxed);
        let sent = flooder.join().expect("flooder").unwrap_or(0);
        let flood_rate = sent as f64 / (duration.as_secs_f64() + 0.4);
        println!("run {}:", i + 1);
        println!("  {}", describe("idle", &idle));
        println!("  {}", describe("flood", &flooded));
        println!("  flood: {flood_rate:.0} datagrams/s from 127.0.0.2");
        ratios.push((flooded.rtt_us(0.5) / idle.rtt_us(0.5) * 1e4) as i64);
    }
    println!(
        "median p50 latency ratio, flooded/idle: {:.3}",
        median(&ratios).unwrap_or(0) as f64 / 1e4
    );
    let (_, log) = cerv.stop();
    if let Some(line) = log.lines().find(|l| l.contains("server stopped")) {
        println!("cerv: {}", line.split("stats=").nth(1).unwrap_or(line));
    }
}

/// Memory and service before and after requests from many spoofed
/// source addresses.
fn spoof_part(count: u32, cerv_args: &[String]) {
    let args: Vec<&str> = cerv_args.iter().map(String::as_str).collect();
    let cerv = Cerv::start(&args);
    println!("\n## spoofing: one request from each of {count} source addresses");
    let warm = run(
        Command::new(bin("fient")).arg(cerv.target()),
        Duration::from_secs(10),
    );
    let before = load::rss_kib(cerv.pid()).unwrap_or(0);
    let started = std::time::Instant::now();
    let sent = load::spoof(cerv.addr, count).expect("spoof");
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = load::rss_kib(cerv.pid()).unwrap_or(0);
    let peak = load::peak_rss_kib(cerv.pid()).unwrap_or(0);
    let check = run(
        Command::new(bin("fient")).arg(cerv.target()),
        Duration::from_secs(10),
    );
    println!(
        "sent {sent} in {:.1} s; cerv RSS {:.1} MiB before, {:.1} MiB after, peak {:.1} MiB; fient before: exit {:?}, after: exit {:?}",
        took.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        peak as f64 / 1024.0,
        warm.code(),
        check.code()
    );
    let (_, log) = cerv.stop();
    if let Some(line) = log.lines().find(|l| l.contains("server stopped")) {
        println!("cerv: {}", line.split("stats=").nth(1).unwrap_or(line));
    }
}
