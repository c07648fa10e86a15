//! How much does the shared-memory clock cost, against reading the clock?
//!
//! Measures, in the same run, ns per call of `ShmReader::now()` and of
//! `clock_gettime` on every clock a reader could age its snapshot with
//! (through the vDSO, as glibc calls it; one through the bare system call
//! for scale). Each figure is the median of several runs of many calls;
//! the ratio is the median of the per-run ratios of `now()` to
//! `clock_gettime(CLOCK_REALTIME)`, so a noisy machine shifts both alike.
//!
//! ```text
//! cargo run --release -p service --example shm_bench               # 5 runs of 1e7 calls
//! cargo run --release -p service --example shm_bench -- --runs 3 --calls 1000000
//! ```

use service::Nanos;
use service::shm::{ClockPair, ShmReader, ShmSnapshot, ShmWriter, interval_at, mono_now};
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

/// ns per call of `f`, over `calls` calls.
fn per_call(calls: u64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..calls {
        f();
    }
    start.elapsed().as_nanos() as f64 / calls as f64
}

fn clock_gettime(id: libc::clockid_t) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec the call only writes.
    unsafe { libc::clock_gettime(black_box(id), &mut ts) };
    black_box(ts);
}

fn syscall_clock_gettime(id: libc::clockid_t) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above, through the system call instead of the vDSO.
    unsafe { libc::syscall(libc::SYS_clock_gettime, black_box(id), &mut ts) };
    black_box(ts);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Args {
    runs: usize,
    calls: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        runs: 5,
        calls: 10_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |_| format!("invalid value '{value}' for {flag}");
        match flag.as_str() {
            "--runs" => args.runs = value.parse().map_err(bad)?,
            "--calls" => args.calls = value.parse().map_err(bad)?,
            _ => {
                return Err(format!(
                    "unknown argument '{flag}' (try --runs N --calls N)"
                ));
            }
        }
    }
    if args.runs == 0 || args.calls == 0 {
        return Err("--runs and --calls must be at least 1".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("shm_bench: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("fient-shm-bench-{}", std::process::id()));
    let result = run(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shm_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("clock");
    let mut writer = ShmWriter::create(&path)?;
    writer.write(&ShmSnapshot::synchronized(
        ClockPair::read(),
        Nanos::from_micros(-50),
        Nanos::from_micros(50),
        50_000,
        Nanos::from_secs(3_600),
    ));
    let reader = ShmReader::open(&path)?;
    reader.now()?;

    let clocks = [
        ("CLOCK_REALTIME", libc::CLOCK_REALTIME),
        ("CLOCK_REALTIME_COARSE", libc::CLOCK_REALTIME_COARSE),
        ("CLOCK_MONOTONIC", libc::CLOCK_MONOTONIC),
        ("CLOCK_MONOTONIC_COARSE", libc::CLOCK_MONOTONIC_COARSE),
        ("CLOCK_MONOTONIC_RAW", libc::CLOCK_MONOTONIC_RAW),
        ("CLOCK_BOOTTIME", libc::CLOCK_BOOTTIME),
    ];
    // The system call is ~10x slower: a tenth of the calls.
    let syscall_calls = (args.calls / 10).max(1);
    let mut clock_ns = vec![Vec::new(); clocks.len()];
    let (mut syscall_ns, mut now_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut snapshot_ns, mut math_ns) = (Vec::new(), Vec::new());
    let snapshot = reader.snapshot()?;
    let mono = mono_now();
    for _ in 0..args.runs {
        let shm = per_call(args.calls, || {
            black_box(reader.now().ok());
        });
        for (i, (_, id)) in clocks.iter().enumerate() {
            clock_ns[i].push(per_call(args.calls, || clock_gettime(*id)));
        }
        syscall_ns.push(per_call(syscall_calls, || {
            syscall_clock_gettime(libc::CLOCK_REALTIME)
        }));
        snapshot_ns.push(per_call(args.calls, || {
            black_box(reader.snapshot().ok());
        }));
        math_ns.push(per_call(args.calls, || {
            black_box(interval_at(black_box(&snapshot), black_box(mono)));
        }));
        now_ns.push(shm);
        ratios.push(shm / clock_ns[0].last().copied().unwrap_or(f64::NAN));
    }

    let source =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_else(|_| "unknown\n".into());
    println!(
        "{} runs of {} calls, median ns per call (clocksource {})",
        args.runs,
        args.calls,
        source.trim()
    );
    for ((name, _), ns) in clocks.iter().zip(clock_ns) {
        println!("  clock_gettime({name:<22}) {:>7.1} ns", median(ns));
    }
    println!(
        "  syscall clock_gettime(CLOCK_REALTIME) {:>6.1} ns",
        median(syscall_ns)
    );
    println!(
        "  ShmReader::now()                      {:>6.1} ns",
        median(now_ns)
    );
    println!(
        "    of which ShmReader::snapshot()      {:>6.1} ns",
        median(snapshot_ns)
    );
    println!(
        "    and interval_at() (the pure math)   {:>6.1} ns",
        median(math_ns)
    );
    println!(
        "ratio now() / clock_gettime(CLOCK_REALTIME): {:.2} (median of per-run ratios)",
        median(ratios)
    );
    Ok(())
}
