//! Programs no one here wrote, run as peers in the interop tests: `ntpdig`,
//! `chronyd` and `chronyc`, libfaketime, `promtool`.
//!
//! `.ci/peers` provides them (see the README) and prints the environment
//! variables that point at them; without the variables, the copies it
//! unpacks under `target/peers` are used, then the `PATH`. A test whose
//! peer is missing says so on stderr and passes without running, unless
//! `CERV_REQUIRE_PEERS=1` (which CI sets): then it fails.
//!
//! [`Chronyd`] runs chronyd the only ways that are safe on a shared
//! machine: `-x` (it never touches the clock) or `-Q` (it only asks), with
//! every file it writes (pid file, command socket) in a private directory,
//! on ports the test chose, and killed by PID when dropped.

use crate::harness::{Finished, run};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A peer program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `ntpdig`, NTPsec's one-shot client (Debian `ntpsec-ntpdig`).
    Ntpdig,
    /// `chronyd` (Debian `chrony`, unpacked, never installed).
    Chronyd,
    /// `chronyc`, chronyd's control program.
    Chronyc,
    /// libfaketime's preload library (Debian `faketime`).
    Faketime,
    /// Prometheus's `promtool` (Debian `prometheus`, unpacked).
    Promtool,
}

impl Peer {
    fn env(self) -> &'static str {
        match self {
            Peer::Ntpdig => "CERV_NTPDIG",
            Peer::Chronyd => "CERV_CHRONYD",
            Peer::Chronyc => "CERV_CHRONYC",
            Peer::Faketime => "CERV_FAKETIME_LIB",
            Peer::Promtool => "CERV_PROMTOOL",
        }
    }

    /// Where `.ci/peers` unpacks it, or its name on the `PATH`.
    fn fallbacks(self) -> Vec<PathBuf> {
        let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers");
        let on_path = |name: &str| -> Option<PathBuf> {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        };
        let mut found: Vec<PathBuf> = match self {
            Peer::Ntpdig => vec![],
            Peer::Chronyd => vec![peers.join("chrony/usr/sbin/chronyd")],
            Peer::Chronyc => vec![peers.join("chrony/usr/bin/chronyc")],
            Peer::Faketime => vec![
                PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                PathBuf::from("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
            ],
            Peer::Promtool => vec![peers.join("prometheus/usr/bin/promtool")],
        };
        let name = match self {
            Peer::Ntpdig => Some("ntpdig"),
            Peer::Promtool => Some("promtool"),
            _ => None,
        };
        found.extend(name.and_then(on_path));
        found
    }

    /// The program, if this machine has it.
    pub fn find(self) -> Option<PathBuf> {
        if let Some(path) = std::env::var_os(self.env()).map(PathBuf::from) {
            return path.is_file().then_some(path);
        }
        self.fallbacks().into_iter().find(|p| p.is_file())
    }

    /// The program for `test`; if it is missing, says so on stderr and
    /// returns `None` (the test then returns early), or panics when
    /// `CERV_REQUIRE_PEERS=1`.
    pub fn require(self, test: &str) -> Option<PathBuf> {
        if let Some(path) = self.find() {
            return Some(path);
        }
        let msg = format!(
            "{test}: peer {self:?} not found (set {} or run `bash .ci/peers`)",
            self.env()
        );
        if std::env::var("CERV_REQUIRE_PEERS").is_ok_and(|v| v == "1") {
            panic!("{msg}, and CERV_REQUIRE_PEERS=1");
        }
        eprintln!("SKIPPED {msg}");
        None
    }
}

/// A directory of our own under the system's temporary directory,
/// removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temporary directory");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `chronyd -x`, killed by PID when dropped.
pub struct Chronyd {
    child: Child,
    dir: TempDir,
    log: Arc<Mutex<String>>,
    chronyc: Option<PathBuf>,
}

/// The lines every chronyd here gets: its files in `dir`, no UDP command
/// port, its command socket in `dir` for chronyc.
fn private_files(dir: &Path) -> String {
    format!(
        "pidfile {d}/chronyd.pid\ncmdport 0\nbindcmdaddress {d}/chronyd.sock\n",
        d = dir.display()
    )
}

/// How to preload libfaketime so that a program's clock reads
/// `offset` (such as `+1.5`, seconds) from the real one. The monotonic
/// clock is left alone; offsets below a second mix badly with the
/// kernel's timestamps (DESIGN.md), so use at least 1 s.
pub fn faketime_env(lib: &Path, offset: &str) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_DONT_RESET".into(), "1".into()),
    ]
}

impl Chronyd {
    /// Starts `chronyd -x -d` (never touching the clock, logging to
    /// stderr) with `conf` plus its private files, under `env` (libfaketime,
    /// say). `chronyc` is used by [`Chronyd::chronyc`].
    pub fn start(
        chronyd: &Path,
        chronyc: Option<PathBuf>,
        conf: &str,
        env: &[(String, String)],
    ) -> Chronyd {
        let dir = TempDir::new("cerv-chronyd");
        // chronyd refuses a command socket in a directory others can enter.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod 700");
        let conf_path = dir.path().join("chrony.conf");
        std::fs::write(&conf_path, format!("{conf}\n{}", private_files(dir.path())))
            .expect("write chrony.conf");
        let mut child = Command::new(chronyd)
            .args(["-x", "-d", "-u", "root", "-f"])
            .arg(&conf_path)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chronyd");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Chronyd {
            child,
            dir,
            log,
            chronyc,
        }
    }

    /// The process id (chronyd -d stays in the foreground: this is it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Runs `chronyc -n ARGS` against this daemon's command socket.
    pub fn chronyc(&self, args: &[&str]) -> Finished {
        let chronyc = self.chronyc.as_ref().expect("chronyc path");
        run(
            Command::new(chronyc)
                .arg("-h")
                .arg(self.dir.path().join("chronyd.sock"))
                .arg("-n")
                .args(args),
            Duration::from_secs(10),
        )
    }

    /// Asks `chronyc ARGS` every 250 ms until `done` says yes to its
    /// output, at most `limit`; returns the last output.
    pub fn wait_for(
        &self,
        args: &[&str],
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> (bool, String) {
        let started = Instant::now();
        loop {
            let out = self.chronyc(args);
            if done(&out.stdout) {
                return (true, out.stdout);
            }
            if started.elapsed() > limit {
                return (false, format!("{}{}", out.stdout, out.stderr));
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits (at most `limit`) until it logs a line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.log().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Its private directory (certificates may go there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `chronyd -Q` (query only: it measures and prints, and never
/// touches the clock) with `conf`, at most `limit`.
pub fn chronyd_query(chronyd: &Path, conf: &str, limit: Duration) -> Finished {
    let dir = TempDir::new("cerv-chronyq");
    let conf_path = dir.path().join("chrony.conf");
    std::fs::write(&conf_path, format!("{conf}\n{}", private_files(dir.path())))
        .expect("write chrony.conf");
    run(
        Command::new(chronyd)
            .args(["-Q", "-u", "root", "-t"])
            .arg(limit.as_secs().max(1).to_string())
            .arg("-f")
            .arg(&conf_path),
        limit + Duration::from_secs(5),
    )
}

/// A free UDP port on `ip`, found by binding port 0 and letting it go.
pub fn free_udp_port(ip: &str) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
