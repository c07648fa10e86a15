//! Telling systemd how the service is doing (`sd_notify(3)`), without
//! libsystemd: one datagram to the socket in `$NOTIFY_SOCKET`.
//!
//! - [`ready`] once serving (`Type=notify`), [`reloading`] then [`ready`]
//!   around a reload (`Type=notify-reload` wants the former's
//!   `MONOTONIC_USEC`), [`stopping`] on the way out, [`status`] for the
//!   line `systemctl status` shows.
//! - [`watchdog`] keeps `WatchdogSec=` satisfied: ping every half of
//!   [`watchdog_interval`], from the code whose progress it vouches for
//!   (a timer task of its own proves only that the runtime is alive).
//!
//! Each returns `Ok(false)` when not run by systemd (no `NOTIFY_SOCKET`):
//! callers need no other test.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// How long a notification may wait for room in systemd's socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends `state` (`READY=1`, `STATUS=...`, several assignments separated
/// by newlines) to `$NOTIFY_SOCKET`. `Ok(false)`: there is none, so no
/// manager listens; `Ok(true)`: sent.
pub fn notify(state: &str) -> io::Result<bool> {
    send(std::env::var_os("NOTIFY_SOCKET").as_deref(), state)
}

fn send(socket: Option<&OsStr>, state: &str) -> io::Result<bool> {
    match socket {
        None => Ok(false),
        Some(s) if s.is_empty() => Ok(false),
        Some(s) => notify_to(s, state).map(|()| true),
    }
}

/// Sends `state` as one datagram to `socket`: a path (`/run/systemd/notify`)
/// or, starting with `@`, a name in the abstract namespace.
pub fn notify_to(socket: impl AsRef<OsStr>, state: &str) -> io::Result<()> {
    let socket = socket.as_ref();
    let addr = match socket.as_bytes() {
        [b'/', ..] => SocketAddr::from_pathname(Path::new(socket))?,
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "notify socket '{}' is neither an absolute path nor an abstract name (@...)",
                    socket.to_string_lossy()
                ),
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("notification cut short: {sent} of {} bytes", state.len()),
        ));
    }
    Ok(())
}

/// `READY=1`: startup is done (or a reload is).
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// `RELOADING=1` with the monotonic clock's reading: a reload begins; send
/// [`ready`] when it is done.
pub fn reloading() -> io::Result<bool> {
    notify(&reloading_state(monotonic_usec()))
}

/// `STOPPING=1`: shutting down.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// `STATUS=msg`: one line for `systemctl status`. Newlines become spaces,
/// so a message cannot add assignments of its own.
pub fn status(msg: &str) -> io::Result<bool> {
    notify(&status_state(msg))
}

/// `WATCHDOG=1`: still alive.
pub fn watchdog() -> io::Result<bool> {
    notify("WATCHDOG=1")
}

/// The watchdog's timeout (`WatchdogSec=`), from `$WATCHDOG_USEC`, when it
/// is meant for this process (`$WATCHDOG_PID` unset, or ours). Ping at half
/// of it.
pub fn watchdog_interval() -> Option<Duration> {
    let var = |name| std::env::var(name).ok();
    watchdog_from(
        var("WATCHDOG_USEC").as_deref(),
        var("WATCHDOG_PID").as_deref(),
        std::process::id(),
    )
}

/// Pings the watchdog at half its timeout; never returns (and does
/// nothing when there is no watchdog). Run it on the runtime that does the
/// work: if that runtime stalls, the pings stop and systemd restarts the
/// service.
pub async fn feed_watchdog() {
    let Some(timeout) = watchdog_interval() else {
        return std::future::pending().await;
    };
    let mut every = tokio::time::interval(timeout / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = watchdog() {
            tracing::debug!("cannot ping the systemd watchdog: {e}");
        }
    }
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>, ours: u32) -> Option<Duration> {
    let for_us = match pid {
        None => true,
        Some(pid) => pid.trim().parse::<u32>().ok() == Some(ours),
    };
    if !for_us {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn reloading_state(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
}

fn status_state(msg: &str) -> String {
    format!("STATUS={}", msg.replace(['\n', '\r'], " "))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares
/// `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to write;
    // CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn receive(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_to(&path, "READY=1").unwrap();
        assert_eq!(receive(&sock), "READY=1");
        notify_to(&path, &status_state("serving\non 3 sockets")).unwrap();
        assert_eq!(receive(&sock), "STATUS=serving on 3 sockets");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cerv-notify-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(format!("@{name}"), "WATCHDOG=1").unwrap();
        assert_eq!(receive(&sock), "WATCHDOG=1");
    }

    #[test]
    fn no_socket_means_no_manager() {
        assert!(!send(None, "READY=1").unwrap());
        assert!(!send(Some(OsStr::new("")), "READY=1").unwrap());
    }

    #[test]
    fn a_bad_socket_is_an_error() {
        let e = notify_to("relative/path", "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("'relative/path'"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        assert!(notify_to(dir.path().join("nobody-there"), "READY=1").is_err());
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        assert_eq!(
            reloading_state(1_234_567),
            "RELOADING=1\nMONOTONIC_USEC=1234567"
        );
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn watchdog_interval_is_ours_only() {
        let us = 4242;
        assert_eq!(
            watchdog_from(Some("30000000"), None, us),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from(Some("30000000"), Some("4242"), us),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_from(Some("30000000"), Some("1"), us), None);
        assert_eq!(watchdog_from(Some("30000000"), Some("x"), us), None);
        assert_eq!(watchdog_from(Some("0"), None, us), None);
        assert_eq!(watchdog_from(Some("soon"), None, us), None);
        assert_eq!(watchdog_from(None, Some("4242"), us), None);
    }

    /// The environment is read only in a child process (this test binary
    /// run again for this test alone), so no test here changes its own.
    #[test]
    fn notify_reads_the_environment() {
        const CHILD: &str = "CERV_SYSTEMD_TEST_CHILD";
        if std::env::var_os(CHILD).is_some() {
            assert!(ready().unwrap());
            assert!(status("up").unwrap());
            assert!(reloading().unwrap());
            assert!(stopping().unwrap());
            assert!(watchdog().unwrap());
            assert_eq!(watchdog_interval(), Some(Duration::from_millis(1500)));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "systemd::tests::notify_reads_the_environment",
                "--exact",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "1500000")
            .env_remove("WATCHDOG_PID")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The child really ran the test, not an empty filter.
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(receive(&sock), "READY=1");
        assert_eq!(receive(&sock), "STATUS=up");
        let reload = receive(&sock);
        assert!(
            reload.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reload}"
        );
        assert_eq!(receive(&sock), "STOPPING=1");
        assert_eq!(receive(&sock), "WATCHDOG=1");
    }
}
