//! Building and starting the real `cerv` and `fient` binaries, for the
//! end-to-end tests (`tests/`) and the benchmarks.
//!
//! - [`bin`] finds a binary of the workspace, building it first (once per
//!   process), so a plain `cargo test` never runs a stale one.
//! - [`Cerv`] starts a server on a free loopback port, reads the port back
//!   from its `listening on` log line (and its NTP, TCP and TLS addresses
//!   from the lines before), and kills it by PID when dropped.
//! - [`run`] runs a command with a time limit and collects its output;
//!   [`fient`] is that for the client.

use service::source::Wire;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The directory holding this build's binaries (`target/debug`, say),
/// found from the running test executable (`target/debug/deps/...`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Runs `cargo build` with `args` for the profile of the running program.
fn cargo_build(args: &[&str]) {
    let dir = profile_dir();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    // cargo gives a test the variables of its package (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, ...). Some build scripts (ring's) watch those
    // very names, so a nested build that inherits them looks changed and
    // recompiles them every time: build as from a plain shell.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_BIN_")
            || name.starts_with("CARGO_CRATE_")
            || name.starts_with("CARGO_PRIMARY_")
            || name.starts_with("CARGO_TARGET_TMPDIR")
            || name.starts_with("CARGO_RUSTC_CURRENT_DIR")
            || name == "OUT_DIR"
        {
            build.env_remove(&*name);
        }
    }
    let status = build
        .args(["build", "--quiet"])
        .args(args)
        .args(["--profile", &profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The path of a workspace binary (`cerv` or `fient`), built for the same
/// profile as the running test on first use.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| cargo_build(&["--bins", "-p", "server", "-p", "client"]));
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The path of an example of the client crate (`drifting_watch`, say),
/// built for the same profile as the running program each time it is
/// asked for (cargo makes that cheap when nothing changed).
pub fn client_example(name: &str) -> PathBuf {
    cargo_build(&["--example", name, "-p", "client"]);
    let path = profile_dir().join("examples").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A finished process.
#[derive(Debug)]
pub struct Finished {
    /// How it ended (`None` if it was killed for running over its limit).
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code, or `None` if killed by a signal or the time limit.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd` to completion, killing it if it runs longer than `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    let mut spawned = spawn(cmd);
    let status = loop {
        if let Some(status) = spawned.child.try_wait().expect("wait") {
            break Some(status);
        }
        if spawned.started.elapsed() > limit {
            let _ = spawned.child.kill();
            let _ = spawned.child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    spawned.finish(status)
}

/// A process running in the background whose output is being collected:
/// a `fient --watch`, say, stopped after a while with [`Spawned::stop`]
/// (and killed if dropped first: a failed test leaves nothing running).
pub struct Spawned {
    child: Child,
    output: Option<(thread::JoinHandle<String>, thread::JoinHandle<String>)>,
    started: Instant,
}

/// Asks `child` to stop with SIGTERM (if it still runs), waits at most
/// `grace`, then kills it: its exit status, or `None` if it had to be
/// killed.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `cmd` with its output collected.
pub fn spawn(cmd: &mut Command) -> Spawned {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    Spawned {
        child,
        output: Some((stdout, stderr)),
        started,
    }
}

impl Spawned {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks it to stop with SIGTERM, waits at most `grace` (then SIGKILL),
    /// and returns what it wrote. `status` is `None` if it had to be
    /// killed.
    pub fn stop(mut self, grace: Duration) -> Finished {
        let status = terminate(&mut self.child, grace);
        self.finish(status)
    }

    /// What it wrote, once it has ended with `status`.
    fn finish(mut self, status: Option<ExitStatus>) -> Finished {
        let (stdout, stderr) = self.output.take().expect("finished once");
        Finished {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `fient` with `args`, for at most 30 s.
pub fn fient(args: &[&str]) -> Finished {
    run(
        Command::new(bin("fient")).args(args),
        Duration::from_secs(30),
    )
}

/// A running `cerv`, killed by PID when dropped.
pub struct Cerv {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The addresses it answers NTP on (`--ntp-listen`), in order.
    pub ntp_addrs: Vec<SocketAddr>,
    /// The addresses it serves over TCP (`--tcp-listen`) and TLS
    /// (`--tls-listen`), with their wire, in the order it logged them.
    pub stream_addrs: Vec<(Wire, SocketAddr)>,
    log: Arc<Mutex<String>>,
    log_reader: Option<thread::JoinHandle<()>>,
}

impl Cerv {
    /// Starts `cerv` on a free loopback port with extra `args`, and waits
    /// (at most 10 s) until it logs that it is listening.
    pub fn start(args: &[&str]) -> Cerv {
        Self::start_on("127.0.0.1:0", args)
    }

    /// Starts `cerv` serving NTS with `certs`' good certificate: the key
    /// exchange and NTP (stratum 1, so clients believe it) on free
    /// loopback ports, no rate limit, then `args` (`--offset`, say).
    pub fn start_nts(certs: &crate::certs::TestCerts, args: &[&str]) -> Cerv {
        let (cert, key) = (
            certs.good.cert.display().to_string(),
            certs.good.key.display().to_string(),
        );
        let mut all = vec![
            "--nts-ke-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--ntp-stratum",
            "1",
        ];
        if !args.contains(&"--ntp-listen") {
            all.extend(["--ntp-listen", "127.0.0.1:0"]);
        }
        if !args.iter().any(|a| a.starts_with("--rate-limit")) {
            all.extend(["--rate-limit", "0"]);
        }
        all.extend_from_slice(args);
        Self::start(&all)
    }

    /// Starts `cerv` listening on `listen`.
    pub fn start_on(listen: &str, args: &[&str]) -> Cerv {
        let mut child = Command::new(bin("cerv"))
            .args(["--listen", listen])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cerv");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let log_reader = {
            let log = log.clone();
            thread::spawn(move || {
                let mut ready = Some(ready_tx);
                let mut ntp = Vec::new();
                let mut streams = Vec::new();
                let addr_after = |line: &str, marker: &str| {
                    line.split(marker)
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                };
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // cerv logs its NTP, TCP and TLS addresses before
                    // "listening on".
                    if let Some(addr) = addr_after(&line, "answering NTP on ") {
                        ntp.push(addr);
                    }
                    for wire in [Wire::Tcp, Wire::Tls] {
                        if let Some(addr) = addr_after(&line, &format!("serving {wire} on ")) {
                            streams.push((wire, addr));
                        }
                    }
                    // The NTS key exchange: where nts:// sources point.
                    if let Some(addr) = addr_after(&line, "serving nts-ke on ") {
                        streams.push((Wire::Nts, addr));
                    }
                    if let Some(addr) = addr_after(&line, "listening on ")
                        && let Some(tx) = ready.take()
                    {
                        let _ =
                            tx.send((addr, std::mem::take(&mut ntp), std::mem::take(&mut streams)));
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            })
        };
        let (addr, ntp_addrs, stream_addrs) = match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = log_reader.join();
                panic!(
                    "cerv did not start listening: {}",
                    log.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
        };
        Cerv {
            child,
            addr,
            ntp_addrs,
            stream_addrs,
            log,
            log_reader: Some(log_reader),
        }
    }

    /// The address as `host:port`, for fient's command line.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// The first NTP address as `ntp://host:port`, for fient's command
    /// line.
    pub fn ntp_target(&self) -> String {
        format!(
            "ntp://{}",
            self.ntp_addrs.first().expect("cerv has no --ntp-listen")
        )
    }

    /// The first address it serves `wire` (TCP or TLS) on.
    pub fn stream_addr(&self, wire: Wire) -> SocketAddr {
        self.stream_addrs
            .iter()
            .find(|(w, _)| *w == wire)
            .map(|&(_, a)| a)
            .unwrap_or_else(|| panic!("cerv has no --{wire}-listen"))
    }

    /// The first TCP address as `tcp://127.0.0.1:PORT`, for fient's
    /// command line.
    pub fn tcp_target(&self) -> String {
        format!("tcp://{}", self.stream_addr(Wire::Tcp))
    }

    /// The first NTS key-exchange address as `nts://localhost:PORT` (the
    /// name its certificate is checked against), for fient's command line.
    pub fn nts_target(&self) -> String {
        format!("nts://localhost:{}", self.stream_addr(Wire::Nts).port())
    }

    /// The first TLS address as `tls://localhost:PORT` (the name its
    /// certificate is checked against), for fient's command line.
    pub fn tls_target(&self) -> String {
        format!("tls://localhost:{}", self.stream_addr(Wire::Tls).port())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Asks it to stop with SIGTERM and waits (at most 10 s, then SIGKILL);
    /// returns its exit status and its whole log.
    pub fn stop(mut self) -> (Option<ExitStatus>, String) {
        let status = terminate(&mut self.child, Duration::from_secs(10));
        if let Some(reader) = self.log_reader.take() {
            let _ = reader.join();
        }
        (status, self.log())
    }
}

impl Drop for Cerv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fields of `fient --json` output, parsed.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// CAP_SYS_TIME is bit 25 of the capability sets in /proc/self/status.
const CAP_SYS_TIME: u32 = 25;

/// Whether a process could hold CAP_SYS_TIME: in its effective or
/// permitted set, or in its bounding set, from which a process of root
/// regains it on exec.
fn has_cap_sys_time(status: &str) -> bool {
    status
        .lines()
        .filter(|l| {
            l.starts_with("CapEff:") || l.starts_with("CapPrm:") || l.starts_with("CapBnd:")
        })
        .any(|l| {
            let hex = l.split_whitespace().nth(1).unwrap_or("0");
            u64::from_str_radix(hex, 16).unwrap_or(u64::MAX) & (1 << CAP_SYS_TIME) != 0
        })
}

/// A command prefix under which a process provably cannot set the clock,
/// checked before it is returned: it panics if there is none, so that a
/// test never runs a clock-setting command with the power to succeed.
/// Tries, in order: nothing (we are already unprivileged), `setpriv`
/// dropping CAP_SYS_TIME from every set, and a user namespace (where even
/// "root" has no power over the real clock).
pub fn without_clock_privilege() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    if !has_cap_sys_time(&status) {
        return vec![];
    }
    let setpriv = [
        "setpriv",
        "--bounding-set=-sys_time",
        "--inh-caps=-sys_time",
        "--ambient-caps=-sys_time",
    ];
    let probe = run(
        Command::new(setpriv[0])
            .args(&setpriv[1..])
            .args(["cat", "/proc/self/status"]),
        Duration::from_secs(10),
    );
    if probe.code() == Some(0) && !has_cap_sys_time(&probe.stdout) {
        return setpriv.iter().map(|s| s.to_string()).collect();
    }
    let userns = ["unshare", "--user", "--map-root-user"];
    let probe = run(
        Command::new(userns[0])
            .args(&userns[1..])
            .args(["cat", "/proc/self/uid_map"]),
        Duration::from_secs(10),
    );
    // In the initial namespace the map is "0 0 4294967295".
    if probe.code() == Some(0) && !probe.stdout.contains("4294967295") {
        return userns.iter().map(|s| s.to_string()).collect();
    }
    panic!("cannot drop CAP_SYS_TIME here (no setpriv nor user namespaces): refusing to run --set");
}
