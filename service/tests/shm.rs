//! The clock segment between real processes: one writer hammering updates,
//! several readers that must never see a torn snapshot; staleness once the
//! writer goes quiet; and the C reader of `docs/fient_clock.h` agreeing
//! with the Rust one.
//!
//! The writer and readers are this test binary run again with
//! `FIENT_SHM_ROLE` set, selecting the `child_role` test; without it that
//! test does nothing.

use service::Nanos;
use service::shm::{ClockPair, Leap, ShmReader, ShmSnapshot, ShmWriter, interval_at, mono_now};
use service::synced::Status;
use service::time::Timestamp;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "FIENT_SHM_ROLE";
const PATH: &str = "FIENT_SHM_PATH";
/// The writer's last snapshot, which tells the readers to stop.
const FINAL: i64 = 1 << 40;
/// The writer stops after this many updates or this long.
const MAX_UPDATES: i64 = 5_000_000;
const WRITE_FOR: Duration = Duration::from_secs(2);
/// Nothing in a child runs longer than this.
const CHILD_LIMIT: Duration = Duration::from_secs(30);
const REAL_BASE: i64 = 1_700_000_000_000_000_000;

/// The `k`th snapshot of the hammering writer: every field a function of
/// `as_of_mono = k`, so a reader can tell a torn read from a whole one.
fn hammer(k: i64) -> ShmSnapshot {
    ShmSnapshot {
        as_of_mono: k,
        as_of_real: Timestamp::from_nanos(REAL_BASE + k),
        offset_low: Nanos::from_nanos(-k),
        offset_high: Nanos::from_nanos(3 * k),
        max_drift_ppb: (k % 1_000_003) as u32,
        status: if k % 2 == 0 {
            Status::Stale
        } else {
            Status::Synchronized
        },
        void_after_mono: k.wrapping_mul(7),
        leap: [Leap::None, Leap::Insert, Leap::Delete][(k % 3) as usize],
    }
}

/// The body of a child process, chosen by `FIENT_SHM_ROLE`.
#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let path = PathBuf::from(std::env::var(PATH).expect("FIENT_SHM_PATH"));
    match role.as_str() {
        "writer" => {
            let mut writer = ShmWriter::create(&path).expect("writer");
            let start = Instant::now();
            let mut k = 1;
            while k <= MAX_UPDATES && start.elapsed() < WRITE_FOR {
                writer.write(&hammer(k));
                k += 1;
            }
            writer.write(&hammer(FINAL));
            println!("writes={}", k - 1);
        }
        "reader" => {
            let reader = ShmReader::open(&path).expect("reader");
            let start = Instant::now();
            let (mut reads, mut changes, mut busy, mut last) = (0u64, 0u64, 0u64, 0);
            loop {
                assert!(start.elapsed() < CHILD_LIMIT, "the writer never finished");
                let s = match reader.snapshot() {
                    Ok(s) => s,
                    Err(service::shm::ShmError::Busy { .. }) => {
                        busy += 1;
                        continue;
                    }
                    Err(e) => panic!("read failed: {e}"),
                };
                assert_eq!(s, hammer(s.as_of_mono), "torn read after {reads} reads");
                assert!(s.as_of_mono >= last, "went back from {last} to {s:?}");
                if s.as_of_mono != last {
                    changes += 1;
                    last = s.as_of_mono;
                }
                reads += 1;
                if reads % 64 == 0 {
                    match reader.now() {
                        Ok(_) => {}
                        // A writer rewriting millions of times a second can
                        // outlast the retries; a real one writes per sync.
                        Err(service::shm::ShmError::Busy { .. }) => busy += 1,
                        Err(e) => panic!("now failed: {e}"),
                    }
                }
                if last == FINAL {
                    break;
                }
            }
            println!("reads={reads} changes={changes} busy={busy}");
        }
        other => panic!("unknown role {other}"),
    }
}

/// A child process, killed by its PID if it outlives the test.
struct Kid(Option<Child>);

impl Drop for Kid {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(role: &str, path: &Path) -> Kid {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["child_role", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(PATH, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Kid(Some(child))
}

/// Waits for `kid` at most until `deadline`, killing it then.
fn finish(mut kid: Kid, deadline: Instant) -> Output {
    let mut child = kid.0.take().unwrap();
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// `name=value` from a child's output.
fn field(output: &Output, name: &str) -> u64 {
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {text}"))
}

fn check(role: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{role} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn readers_in_other_processes_never_see_a_torn_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clock");
    // The segment exists before anyone reads; the writer process takes it
    // over in place, keeping snapshot 0.
    ShmWriter::create(&path).unwrap().write(&hammer(0));
    let readers: Vec<Kid> = (0..3).map(|_| spawn("reader", &path)).collect();
    let writer = spawn("writer", &path);
    let deadline = Instant::now() + CHILD_LIMIT;
    let written = finish(writer, deadline);
    check("writer", &written);
    let writes = field(&written, "writes");
    assert!(writes > 1_000, "only {writes} writes");
    for reader in readers {
        let read = finish(reader, deadline);
        check("reader", &read);
        let (reads, changes) = (field(&read, "reads"), field(&read, "changes"));
        eprintln!(
            "writes={writes} reads={reads} changes={changes} busy={}",
            field(&read, "busy")
        );
        assert!(reads > 0);
        // Saw the writer at work, not only before and after it.
        assert!(changes > 2, "{changes} changes seen");
    }
}

#[test]
fn the_status_turns_stale_when_the_writer_goes_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clock");
    let mut writer = ShmWriter::create(&path).unwrap();
    let reader = ShmReader::open(&path).unwrap();
    writer.write(&ShmSnapshot::synchronized(
        ClockPair::read(),
        Nanos::from_millis(-100),
        Nanos::from_millis(100),
        50_000,
        Nanos::from_millis(200),
    ));
    let fresh = reader.now().unwrap();
    assert_eq!(fresh.status, Status::Synchronized);
    std::thread::sleep(Duration::from_millis(300));
    let old = reader.now().unwrap();
    assert_eq!(old.status, Status::Stale);
    // Still an interval, wider by the drift of the time gone by.
    assert!(old.width() > fresh.width());
    assert!(old.earliest > fresh.earliest);
    // CLOCK_REALTIME, which the snapshot says is within 100 ms of the true
    // time, is inside (read a little later, with room for a preemption).
    let real = service::Clock::now(&service::SystemClock);
    assert!(old.contains(real), "{old:?} vs {real}");
}

/// The C checker, compiled against docs/fient_clock.h; None without gcc.
fn c_checker(dir: &Path) -> Option<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.join("fient_clock_check");
    let compiled = Command::new("gcc")
        .args(["-std=c11", "-D_DEFAULT_SOURCE", "-O2", "-Wall", "-Wextra"])
        .args(["-Werror", "-pedantic", "-I"])
        .arg(manifest.join("../docs"))
        .arg(manifest.join("tests/c/fient_clock_check.c"))
        .arg("-o")
        .arg(&exe)
        .output();
    match compiled {
        Err(e) => {
            eprintln!("skipping the C reader test: cannot run gcc ({e})");
            None
        }
        Ok(out) => {
            assert!(
                out.status.success(),
                "docs/fient_clock.h does not compile:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(exe)
        }
    }
}

/// 2027-01-01T00:00:00Z, a midnight for the leap seconds.
const NEW_YEAR: i64 = 1_798_761_600_000_000_000;
const SECOND: i64 = 1_000_000_000;

/// A small deterministic generator of test values.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn choose<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[(self.next() % from.len() as u64) as usize]
    }

    /// A nanosecond value: an edge, a small one, one near a leap second,
    /// or anything at all.
    fn pick(&mut self) -> i64 {
        let edges = [0, 1, -1, SECOND, -SECOND, NEW_YEAR, NEW_YEAR - SECOND];
        let r = self.next();
        match r % 5 {
            0 => *self.choose(&edges),
            1 => *self.choose(&[i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1]),
            2 => ((r >> 8) % 100_000) as i64 - 50_000,
            3 => NEW_YEAR + ((r >> 8) % (4 * SECOND as u64)) as i64 - 2 * SECOND,
            _ => (r >> 2) as i64 * if r & 2 == 0 { 1 } else { -1 },
        }
    }
}

fn status_code(status: Status) -> u32 {
    match status {
        Status::Unsynchronized => 0,
        Status::Synchronized => 1,
        Status::Stale => 2,
        Status::Disagreement => 3,
    }
}

#[test]
fn the_c_reader_computes_what_the_rust_reader_computes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(checker) = c_checker(dir.path()) else {
        return;
    };
    // Named edges, then a spread of values: small, day-sized and extreme.
    let mut cases = vec![
        (hammer(1), 1),
        (hammer(2), 0),
        (hammer(4), 1 << 40),
        (hammer(5), -(1 << 40)),
    ];
    let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);
    for _ in 0..2_000 {
        let (a, b) = (rng.pick(), rng.pick());
        let snapshot = ShmSnapshot {
            as_of_mono: rng.pick(),
            as_of_real: Timestamp::from_nanos(rng.pick()),
            offset_low: Nanos::from_nanos(a.min(b)),
            offset_high: Nanos::from_nanos(a.max(b)),
            max_drift_ppb: *rng.choose(&[0, 1, 50_000, 500_000, u32::MAX]),
            status: *rng.choose(&[
                Status::Unsynchronized,
                Status::Synchronized,
                Status::Stale,
                Status::Disagreement,
            ]),
            void_after_mono: rng.pick(),
            leap: *rng.choose(&[Leap::None, Leap::Insert, Leap::Delete]),
        };
        cases.push((snapshot, rng.pick()));
    }
    let mut input = String::new();
    let mut want = String::new();
    for (c, mono) in &cases {
        let leap = [Leap::None, Leap::Insert, Leap::Delete]
            .iter()
            .position(|l| *l == c.leap)
            .unwrap();
        input += &format!(
            "{} {} {} {} {} {} {} {} {}\n",
            c.as_of_mono,
            c.as_of_real.as_nanos(),
            c.offset_low.as_nanos(),
            c.offset_high.as_nanos(),
            c.max_drift_ppb,
            status_code(c.status),
            c.void_after_mono,
            leap,
            mono
        );
        let i = interval_at(c, *mono);
        want += &format!(
            "{} {} {}\n",
            status_code(i.status),
            i.earliest.as_nanos(),
            i.latest.as_nanos()
        );
    }
    let mut child = Command::new(&checker)
        .arg("pure")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let got = String::from_utf8(out.stdout).unwrap();
    for ((g, w), i) in got.lines().zip(want.lines()).zip(input.lines()) {
        assert_eq!(g, w, "C and Rust disagree on input {i}");
    }
    assert_eq!(got.lines().count(), cases.len());
}

#[test]
fn the_c_reader_reads_a_segment_the_rust_writer_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let Some(checker) = c_checker(dir.path()) else {
        return;
    };
    let path = dir.path().join("clock");
    let mut writer = ShmWriter::create(&path).unwrap();
    let reader = ShmReader::open(&path).unwrap();
    let mut snapshot = ShmSnapshot::synchronized(
        ClockPair::read(),
        Nanos::from_millis(-1),
        Nanos::from_millis(2),
        50_000,
        Nanos::from_secs(60),
    );
    // A deletion moves the answer only forward, so "between two readings"
    // holds even if this runs at midnight UTC.
    snapshot.leap = Leap::Delete;
    writer.write(&snapshot);
    let before = reader.now().unwrap();
    let out = Command::new(&checker)
        .arg("now")
        .arg(&path)
        .output()
        .unwrap();
    let after = reader.now().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<i64> = text
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    let [status, earliest, latest] = fields[..] else {
        panic!("unexpected output {text}");
    };
    eprintln!("rust before {before:?}\nc {text}rust after {after:?}");
    assert_eq!(status, i64::from(status_code(before.status)));
    // Read between two Rust readings, the C answer lies between theirs.
    assert!(before.earliest.as_nanos() <= earliest && earliest <= after.earliest.as_nanos());
    assert!(before.latest.as_nanos() <= latest && latest <= after.latest.as_nanos());
    assert!(mono_now() > snapshot.as_of_mono);
}

#[test]
fn the_c_reader_refuses_what_the_rust_reader_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let Some(checker) = c_checker(dir.path()) else {
        return;
    };
    let open = |path: &Path| -> i32 {
        let out = Command::new(&checker)
            .arg("open")
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let good = dir.path().join("clock");
    drop(ShmWriter::create(&good).unwrap());
    assert_eq!(open(&good), 0);
    assert_eq!(open(&dir.path().join("missing")), -1);
    let edited = |offset: usize, bytes: &[u8]| {
        let path = dir.path().join(format!("edited-{offset}"));
        let mut all = std::fs::read(&good).unwrap();
        all[offset..offset + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&path, all).unwrap();
        assert!(ShmReader::open(&path).is_err());
        path
    };
    assert_eq!(open(&edited(0, b"CLOCKBND")), -2);
    assert_eq!(open(&edited(8, &2u32.to_ne_bytes())), -3);
    assert_eq!(open(&edited(8, &0u32.to_ne_bytes())), -4);
    assert_eq!(open(&edited(12, &64u32.to_ne_bytes())), -5);
    assert_eq!(open(&edited(80, &[0x5a; 16])), -6);
}
