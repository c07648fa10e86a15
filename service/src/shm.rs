//! The clock for every process: fient publishes what it knows about the
//! time in a small shared-memory segment, and any process on the host
//! reads an honest interval from it with no system call (one vDSO clock
//! read and a few loads), the way AWS ClockBound's segment works.
//!
//! ```no_run
//! use service::shm::ShmReader;
//! use std::path::Path;
//!
//! let clock = ShmReader::open(Path::new(service::shm::DEFAULT_PATH))?;
//! let now = clock.now()?;
//! println!("between {} and {} ({:?})", now.earliest, now.latest, now.status);
//! # Ok::<(), service::shm::ShmError>(())
//! ```
//!
//! The byte layout, the rules for writers and readers, and a C reader
//! (`docs/fient_clock.h`) are in `docs/SHM.md`; this module is the
//! reference implementation of both sides.
//!
//! - [`ShmWriter`]: the single writer (the fient daemon) publishes a
//!   [`ShmSnapshot`] under a seqlock.
//! - [`ShmReader`]: maps the segment read-only; [`ShmReader::now`] reads a
//!   consistent snapshot, then the clock, then calls [`interval_at`].
//! - [`interval_at`]: the pure part, snapshot + clock reading → interval.
//!
//! # Which clock ages the snapshot, and what a step of the clock does
//!
//! A snapshot says: at the instant `as_of_mono` on [`AGING_CLOCK`]
//! (`CLOCK_BOOTTIME`), `CLOCK_REALTIME` read `as_of_real`, and the true
//! time minus `CLOCK_REALTIME` lay in `[offset_low, offset_high]`. A
//! reader reads only `CLOCK_BOOTTIME` and carries the snapshot forward
//! along it: the realtime estimate is `as_of_real + age`, widened by
//! `max_drift_ppb` of the age on each side. It never reads
//! `CLOCK_REALTIME`, and that is what keeps it honest when someone steps
//! `CLOCK_REALTIME` (`date -s`, another daemon, a leap second): the
//! interval is anchored on a clock no step moves, so it goes on holding
//! the true time, while the stepped `CLOCK_REALTIME` is simply off by the
//! step until the writer notices and publishes again. A reader that added
//! the bound to its own `CLOCK_REALTIME` reading (ClockBound's way) would
//! move its whole interval with the step and hold the wrong time until
//! then. Without a step the two ways agree: `CLOCK_BOOTTIME` and
//! `CLOCK_REALTIME` run at the same, disciplined, rate in the kernel and
//! differ only by offsets that steps and suspend change.
//!
//! Why `CLOCK_BOOTTIME` (costs measured on this project's machines, all
//! through the vDSO; `examples/shm_bench.rs` prints them):
//! - `CLOCK_MONOTONIC_COARSE` (≈ 9 ns, vs ≈ 35 ns for the others) ticks
//!   only every 4 ms (HZ=250): fine to age a bound, far too coarse to carry
//!   the time itself forward, which is what makes a reader step-proof.
//! - `CLOCK_MONOTONIC_RAW` is out of reach of every correction, which also
//!   means it runs at the crystal's own, uncorrected rate: the projection
//!   would drift by the crystal's error (tens of ppm), not by the
//!   disciplined clock's.
//! - `CLOCK_MONOTONIC` runs at the disciplined rate, but stops during
//!   suspend: after a resume the projection would be late by the whole
//!   sleep, and `void_after` would not have passed.
//! - `CLOCK_BOOTTIME` is `CLOCK_MONOTONIC` plus time spent suspended: the
//!   disciplined rate, no steps, and it counts a sleep as the calendar
//!   does. Same cost as the rest (≈ 35 ns here).
//!
//! What the writer must keep true, since readers trust it: `max_drift_ppb`
//! covers how fast the disciplined clock may wander from the true time,
//! including any slew it has under way (or it publishes again often while
//! slewing); after stepping or slewing `CLOCK_REALTIME` itself it publishes
//! a new snapshot. What no one can keep true: a virtual machine paused or
//! migrated, or a resume whose sleep the kernel measured with a coarse RTC,
//! moves all the clocks by an unknown amount; readers are honest again
//! after the writer's next sync.

use crate::synced::{Status, TimeInterval};
use crate::time::{Nanos, Timestamp};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering, fence};

/// The first eight bytes of every segment.
pub const MAGIC: [u8; 8] = *b"FIENTCLK";
/// The layout version this code reads and writes. It changes whenever a
/// reader of the old version could misread the segment.
pub const VERSION: u32 = 1;
/// Bytes in a version-1 segment (the fields and room for growth).
pub const SEGMENT_SIZE: usize = 256;
/// Where the fient daemon publishes, by default.
pub const DEFAULT_PATH: &str = "/dev/shm/fient-clock";
/// The clock `as_of_mono` and `void_after_mono` are read on.
pub const AGING_CLOCK: libc::clockid_t = libc::CLOCK_BOOTTIME;

/// How often a reader tries before giving up on a segment that keeps
/// changing: first spinning (a write takes nanoseconds), then yielding the
/// CPU (the writer may have been preempted in the middle of one).
const SPIN_ATTEMPTS: u32 = 100;
const MAX_ATTEMPTS: u32 = 1_100;

/// The segment as it lies in memory. Every field is an atomic, so that
/// neither side ever races on plain memory with the other process; on
/// x86_64 and aarch64 these are ordinary loads and stores.
#[repr(C)]
struct Segment {
    magic: AtomicU64,
    version: AtomicU32,
    size: AtomicU32,
    seq: AtomicU64,
    as_of_mono: AtomicI64,
    as_of_real: AtomicI64,
    offset_low: AtomicI64,
    offset_high: AtomicI64,
    max_drift_ppb: AtomicU32,
    status: AtomicU32,
    void_after_mono: AtomicI64,
    leap: AtomicU32,
    reserved0: AtomicU32,
    boot_id: [AtomicU64; 2],
    reserved: [AtomicU64; 20],
}

// The layout of docs/SHM.md, checked at compile time.
const _: () = {
    assert!(size_of::<Segment>() == SEGMENT_SIZE);
    assert!(offset_of!(Segment, magic) == 0);
    assert!(offset_of!(Segment, version) == 8);
    assert!(offset_of!(Segment, size) == 12);
    assert!(offset_of!(Segment, seq) == 16);
    assert!(offset_of!(Segment, as_of_mono) == 24);
    assert!(offset_of!(Segment, as_of_real) == 32);
    assert!(offset_of!(Segment, offset_low) == 40);
    assert!(offset_of!(Segment, offset_high) == 48);
    assert!(offset_of!(Segment, max_drift_ppb) == 56);
    assert!(offset_of!(Segment, status) == 60);
    assert!(offset_of!(Segment, void_after_mono) == 64);
    assert!(offset_of!(Segment, leap) == 72);
    assert!(offset_of!(Segment, reserved0) == 76);
    assert!(offset_of!(Segment, boot_id) == 80);
    assert!(offset_of!(Segment, reserved) == 96);
};

/// The magic as the native-endian word whose bytes in memory spell it.
const MAGIC_WORD: u64 = u64::from_ne_bytes(MAGIC);

/// A leap second announced for the end of the UTC day that holds
/// `as_of_real`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leap {
    /// None announced.
    None,
    /// 23:59:60 is inserted: `CLOCK_REALTIME` repeats a second at midnight.
    Insert,
    /// 23:59:59 is deleted: `CLOCK_REALTIME` skips a second.
    Delete,
}

/// What the writer knows, as published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmSnapshot {
    /// [`AGING_CLOCK`] (`CLOCK_BOOTTIME`), ns, when the estimate was made.
    pub as_of_mono: i64,
    /// `CLOCK_REALTIME` at that instant.
    pub as_of_real: Timestamp,
    /// The true time minus `CLOCK_REALTIME` was at least this at `as_of`.
    pub offset_low: Nanos,
    /// ... and at most this.
    pub offset_high: Nanos,
    /// How fast the bound widens with age, in parts per billion.
    pub max_drift_ppb: u32,
    /// The writer's verdict: `Stale` while it runs free (no source
    /// answers), `Unsynchronized` when it knows nothing.
    pub status: Status,
    /// After this [`AGING_CLOCK`] time readers report `Stale` whatever
    /// the writer said: the writer has not been heard from.
    pub void_after_mono: i64,
    /// A leap second at the end of the UTC day that holds `as_of_real`.
    pub leap: Leap,
}

impl ShmSnapshot {
    /// Knows nothing: readers answer with an unbounded interval.
    pub fn unsynchronized() -> ShmSnapshot {
        ShmSnapshot {
            as_of_mono: 0,
            as_of_real: Timestamp::EPOCH,
            offset_low: Nanos::ZERO,
            offset_high: Nanos::ZERO,
            max_drift_ppb: 0,
            status: Status::Unsynchronized,
            void_after_mono: 0,
            leap: Leap::None,
        }
    }

    /// A synchronized snapshot anchored at `at`: true time minus
    /// `CLOCK_REALTIME` in `[low, high]`, widening by `max_drift_ppb`,
    /// void `valid_for` after `at`. The time `at` took to read is folded
    /// into `low` (see [`ClockPair`]).
    pub fn synchronized(
        at: ClockPair,
        low: Nanos,
        high: Nanos,
        max_drift_ppb: u32,
        valid_for: Nanos,
    ) -> ShmSnapshot {
        ShmSnapshot {
            as_of_mono: at.mono,
            as_of_real: at.real,
            offset_low: low.saturating_sub(at.gap),
            offset_high: high,
            max_drift_ppb,
            status: Status::Synchronized,
            void_after_mono: at.mono.saturating_add(valid_for.as_nanos()),
            leap: Leap::None,
        }
    }
}

/// `CLOCK_REALTIME` read as close as possible to an [`AGING_CLOCK`]
/// reading: `real` was read at some instant in `[mono, mono + gap]`. So
/// the realtime clock read between `real - gap` and `real` at `mono`, and
/// a writer anchoring at `(mono, real)` lowers its `low` by `gap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockPair {
    /// [`AGING_CLOCK`], ns.
    pub mono: i64,
    /// `CLOCK_REALTIME`.
    pub real: Timestamp,
    /// How long the reading took.
    pub gap: Nanos,
}

impl ClockPair {
    /// Reads `mono, real, mono` three times and keeps the tightest.
    pub fn read() -> ClockPair {
        let mut best: Option<ClockPair> = None;
        for _ in 0..3 {
            let before = mono_now();
            let real = Timestamp::from_nanos(read_clock(libc::CLOCK_REALTIME));
            let after = mono_now();
            let pair = ClockPair {
                mono: before,
                real,
                gap: Nanos::from_nanos(after.saturating_sub(before).max(0)),
            };
            if best.is_none_or(|b| pair.gap < b.gap) {
                best = Some(pair);
            }
        }
        best.unwrap_or(ClockPair {
            mono: mono_now(),
            real: Timestamp::from_nanos(read_clock(libc::CLOCK_REALTIME)),
            gap: Nanos::ZERO,
        })
    }
}

/// [`AGING_CLOCK`] now, ns.
#[inline]
pub fn mono_now() -> i64 {
    read_clock(AGING_CLOCK)
}

#[inline]
fn read_clock(id: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call only writes; the ids used
    // here exist on every Linux since 2.6.39, so the call cannot fail.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

/// `ceil(age × ppb / 1e9)`, in 64 bits whenever the product fits (ages
/// up to 10 hours at 500 ppm, 4 days at 50 ppm), since a 128-bit division
/// is a library call that would add half again to a reader's cost.
#[inline]
fn widening(age: u128, ppb: u32) -> u128 {
    match u64::try_from(age)
        .ok()
        .and_then(|a| a.checked_mul(u64::from(ppb)))
    {
        Some(product) => u128::from(product.div_ceil(1_000_000_000)),
        // |age| < 2^64 and ppb < 2^32: the product fits in 128 bits.
        None => (age * u128::from(ppb)).div_ceil(1_000_000_000),
    }
}

/// Nanoseconds in a UTC day (leap seconds aside, as POSIX counts).
const DAY: i128 = 86_400_000_000_000;
const SECOND: i128 = 1_000_000_000;

/// The interval the snapshot `s` gives when [`AGING_CLOCK`] reads
/// `mono_now`. Pure.
///
/// - The realtime estimate is `as_of_real + age`, `age = mono_now -
///   as_of_mono`; the interval is that plus `[offset_low, offset_high]`,
///   widened on each side by `ceil(max_drift_ppb × |age| / 1e9)`.
/// - A negative age (the reader's clock reading before the writer's,
///   which one host with one clock never gives) carries the snapshot
///   backwards and widens it by the drift over `|age|`: the drift bound
///   holds in both directions, so the answer stays honest.
/// - `Stale` when the writer said so or `mono_now > void_after_mono`; the
///   interval is still honest as long as the drift bound is.
/// - `Unsynchronized` passes through as `[i64::MIN, i64::MAX]`.
/// - An announced leap second is applied as the kernel applies it to
///   `CLOCK_REALTIME` at the midnight that ends `as_of_real`'s UTC day
///   (an insertion reads one second less from midnight on, repeating
///   23:59:59; a deletion one second more from 23:59:59 on, skipping it):
///   the interval becomes the smallest one holding the image of every
///   point in it, so it widens while it straddles the leap and moves by
///   the whole second once past it.
/// - Results beyond the `i64` range saturate.
#[inline]
pub fn interval_at(s: &ShmSnapshot, mono_now: i64) -> TimeInterval {
    if s.status == Status::Unsynchronized {
        return TimeInterval {
            earliest: Timestamp::from_nanos(i64::MIN),
            latest: Timestamp::from_nanos(i64::MAX),
            status: Status::Unsynchronized,
        };
    }
    let age = i128::from(mono_now) - i128::from(s.as_of_mono);
    // At most 2^64 × 2^32 / 1e9 < 2^67: fits.
    let widen = widening(age.unsigned_abs(), s.max_drift_ppb) as i128;
    let real = i128::from(s.as_of_real.as_nanos()) + age;
    let mut lo = real + i128::from(s.offset_low.as_nanos()) - widen;
    let mut hi = real + i128::from(s.offset_high.as_nanos()) + widen;
    // Divisions of i128 are library calls: only when a leap is announced.
    let midnight = match s.leap {
        Leap::None => 0,
        _ => (i128::from(s.as_of_real.as_nanos()).div_euclid(DAY) + 1) * DAY,
    };
    match s.leap {
        Leap::None => {}
        // Past midnight, CLOCK_REALTIME reads one second less than the
        // projection; the repeated second reads [midnight - 1 s, midnight).
        Leap::Insert if lo >= midnight => (lo, hi) = (lo - SECOND, hi - SECOND),
        // Straddling: [lo, midnight) stays, [midnight, hi] moves back.
        Leap::Insert if hi >= midnight => {
            (lo, hi) = (lo.min(midnight - SECOND), (hi - SECOND).max(midnight - 1))
        }
        Leap::Insert => {}
        // From 23:59:59 on, CLOCK_REALTIME reads one second more.
        Leap::Delete if lo >= midnight - SECOND => (lo, hi) = (lo + SECOND, hi + SECOND),
        Leap::Delete if hi >= midnight - SECOND => hi += SECOND,
        Leap::Delete => {}
    }
    let stale = s.status == Status::Stale || mono_now > s.void_after_mono;
    let clamp = |v: i128| Timestamp::from_nanos(v.clamp(i64::MIN.into(), i64::MAX.into()) as i64);
    TimeInterval {
        earliest: clamp(lo),
        latest: clamp(hi),
        status: match (stale, s.status) {
            (true, _) => Status::Stale,
            (false, Status::Disagreement) => Status::Disagreement,
            (false, _) => Status::Synchronized,
        },
    }
}

/// Why a segment cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// Nothing at the path: the writer has not started (or uses another).
    #[error("no clock segment at '{}': is the fient daemon running?", path.display())]
    NotFound {
        /// The path tried.
        path: PathBuf,
    },
    /// The file could not be opened, inspected or mapped.
    #[error("cannot map clock segment '{}': {source}", path.display())]
    Io {
        /// The path tried.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file is not a fient clock segment.
    #[error("'{}' is not a fient clock segment: magic is {found:02x?}, expected \"FIENTCLK\"", path.display())]
    WrongMagic {
        /// The path tried.
        path: PathBuf,
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// Written by a newer fient, in a layout this reader does not know.
    #[error("clock segment '{}' has layout version {found}, newer than the {supported} this reader knows: update the reader", path.display())]
    NewerVersion {
        /// The path tried.
        path: PathBuf,
        /// The version in the segment.
        found: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// Written in a layout older than any this reader knows.
    #[error("clock segment '{}' has layout version {found}, older than the {supported} this reader knows", path.display())]
    OlderVersion {
        /// The path tried.
        path: PathBuf,
        /// The version in the segment.
        found: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// The file or its declared size is smaller than the layout.
    #[error("clock segment '{}' is {found} bytes, smaller than the {needed} of layout version {VERSION}", path.display())]
    TooSmall {
        /// The path tried.
        path: PathBuf,
        /// The smaller of the file's length and its declared size.
        found: u64,
        /// [`SEGMENT_SIZE`].
        needed: u64,
    },
    /// The segment was written during an earlier boot: its clock readings
    /// mean nothing now.
    #[error("clock segment '{}' was written before the last reboot: is the fient daemon running?", path.display())]
    OtherBoot {
        /// The path tried.
        path: PathBuf,
    },
    /// Every attempt to read met a write under way.
    #[error(
        "clock segment kept changing while being read ({attempts} attempts): is its writer stuck in an update?"
    )]
    Busy {
        /// How many times the reader tried.
        attempts: u32,
    },
    /// A field holds a value no writer of this version writes.
    #[error("clock segment holds an invalid {field}: {value}")]
    Malformed {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: i64,
    },
}

/// A shared mapping of one segment, unmapped on drop.
struct Mapping {
    segment: NonNull<Segment>,
}

// SAFETY: the mapping is plain memory that every thread may touch, and all
// access goes through the atomics of `Segment`.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Segment` only offers atomic operations.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first [`SEGMENT_SIZE`] bytes of `file`, which the caller
    /// has checked is at least that long (a mapping past the end of a file
    /// faults on access).
    fn new(file: &File, writable: bool) -> io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel, of a file
        // descriptor that is open for the duration of the call; the result
        // is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SEGMENT_SIZE,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // mmap returns page-aligned memory, aligned enough for `Segment`,
        // and never null on success.
        let segment = NonNull::new(addr.cast::<Segment>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Mapping { segment })
    }

    #[inline]
    fn segment(&self) -> &Segment {
        // SAFETY: the mapping is SEGMENT_SIZE bytes, page-aligned, lives as
        // long as `self`, and is only ever accessed through atomics (every
        // bit pattern is a valid atomic integer). A read-only mapping is
        // only ever loaded from: readers never call a store.
        unsafe { self.segment.as_ref() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the address and length of our own mapping; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.segment.as_ptr().cast(), SEGMENT_SIZE) };
    }
}

/// The kernel's identifier of this boot (`/proc/sys/kernel/random/boot_id`)
/// as two native words of its 16 bytes, or zeros if it cannot be read
/// (which turns the check off).
fn boot_id() -> [u64; 2] {
    let Ok(text) = fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return [0, 0];
    };
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    match u128::from_str_radix(&hex, 16) {
        Ok(id) if hex.len() == 32 => {
            let bytes = id.to_be_bytes();
            [
                u64::from_ne_bytes(bytes[..8].try_into().unwrap_or_default()),
                u64::from_ne_bytes(bytes[8..].try_into().unwrap_or_default()),
            ]
        }
        _ => [0, 0],
    }
}

/// What one consistent read of the data found, unchecked.
#[derive(Clone, Copy, Debug)]
struct Raw {
    as_of_mono: i64,
    as_of_real: i64,
    offset_low: i64,
    offset_high: i64,
    max_drift_ppb: u32,
    status: u32,
    void_after_mono: i64,
    leap: u32,
    boot_id: [u64; 2],
}

impl Segment {
    /// One consistent copy of the data (the reader's half of the seqlock).
    #[inline]
    fn read(&self) -> Result<Raw, ShmError> {
        for attempt in 0..MAX_ATTEMPTS {
            // Acquire: if this sees the writer's closing (even) store, the
            // loads below see everything written before it.
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let raw = Raw {
                    as_of_mono: self.as_of_mono.load(Ordering::Relaxed),
                    as_of_real: self.as_of_real.load(Ordering::Relaxed),
                    offset_low: self.offset_low.load(Ordering::Relaxed),
                    offset_high: self.offset_high.load(Ordering::Relaxed),
                    max_drift_ppb: self.max_drift_ppb.load(Ordering::Relaxed),
                    status: self.status.load(Ordering::Relaxed),
                    void_after_mono: self.void_after_mono.load(Ordering::Relaxed),
                    leap: self.leap.load(Ordering::Relaxed),
                    boot_id: [
                        self.boot_id[0].load(Ordering::Relaxed),
                        self.boot_id[1].load(Ordering::Relaxed),
                    ],
                };
                // Pairs with the writer's release fence: if any load above
                // saw a store of a write that began after `before`, the
                // odd sequence number that began it is visible below.
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return Ok(raw);
                }
            }
            if attempt < SPIN_ATTEMPTS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Err(ShmError::Busy {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Publishes `s` (the writer's half of the seqlock).
    fn write(&self, s: &ShmSnapshot, boot_id: [u64; 2]) {
        // Only the writer stores `seq`. A writer that died mid-update left
        // it odd: stay odd while writing, then make it even.
        let odd = self.seq.load(Ordering::Relaxed) | 1;
        self.seq.store(odd, Ordering::Relaxed);
        // Orders the odd store before every data store below, for any
        // reader whose acquire fence follows a load of one of them.
        fence(Ordering::Release);
        self.as_of_mono.store(s.as_of_mono, Ordering::Relaxed);
        self.as_of_real
            .store(s.as_of_real.as_nanos(), Ordering::Relaxed);
        self.offset_low
            .store(s.offset_low.as_nanos(), Ordering::Relaxed);
        self.offset_high
            .store(s.offset_high.as_nanos(), Ordering::Relaxed);
        self.max_drift_ppb.store(s.max_drift_ppb, Ordering::Relaxed);
        self.status.store(status_code(s.status), Ordering::Relaxed);
        self.void_after_mono
            .store(s.void_after_mono, Ordering::Relaxed);
        self.leap.store(leap_code(s.leap), Ordering::Relaxed);
        self.boot_id[0].store(boot_id[0], Ordering::Relaxed);
        self.boot_id[1].store(boot_id[1], Ordering::Relaxed);
        // Release: a reader that sees the even number sees all of the above.
        self.seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Checks the header; `path` names the segment in errors.
    fn check_header(&self, path: &Path) -> Result<(), ShmError> {
        let magic = self.magic.load(Ordering::Relaxed);
        if magic != MAGIC_WORD {
            return Err(ShmError::WrongMagic {
                path: path.to_owned(),
                found: magic.to_ne_bytes(),
            });
        }
        let version = self.version.load(Ordering::Relaxed);
        if version > VERSION {
            return Err(ShmError::NewerVersion {
                path: path.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        if version < VERSION {
            return Err(ShmError::OlderVersion {
                path: path.to_owned(),
                found: version,
                supported: VERSION,
            });
        }
        let size = self.size.load(Ordering::Relaxed);
        if (size as usize) < SEGMENT_SIZE {
            return Err(ShmError::TooSmall {
                path: path.to_owned(),
                found: u64::from(size),
                needed: SEGMENT_SIZE as u64,
            });
        }
        Ok(())
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

fn leap_code(leap: Leap) -> u32 {
    match leap {
        Leap::None => 0,
        Leap::Insert => 1,
        Leap::Delete => 2,
    }
}

impl Raw {
    /// The snapshot, if every field holds a value a writer may write.
    #[inline]
    fn check(self) -> Result<ShmSnapshot, ShmError> {
        let status = match self.status {
            0 => Status::Unsynchronized,
            1 => Status::Synchronized,
            2 => Status::Stale,
            3 => Status::Disagreement,
            other => {
                return Err(ShmError::Malformed {
                    field: "status",
                    value: other.into(),
                });
            }
        };
        let leap = match self.leap {
            0 => Leap::None,
            1 => Leap::Insert,
            2 => Leap::Delete,
            other => {
                return Err(ShmError::Malformed {
                    field: "leap",
                    value: other.into(),
                });
            }
        };
        // An empty interval would claim more than anyone knows.
        if status != Status::Unsynchronized && self.offset_low > self.offset_high {
            return Err(ShmError::Malformed {
                field: "offset interval (low above high)",
                value: self.offset_low,
            });
        }
        Ok(ShmSnapshot {
            as_of_mono: self.as_of_mono,
            as_of_real: Timestamp::from_nanos(self.as_of_real),
            offset_low: Nanos::from_nanos(self.offset_low),
            offset_high: Nanos::from_nanos(self.offset_high),
            max_drift_ppb: self.max_drift_ppb,
            status,
            void_after_mono: self.void_after_mono,
            leap,
        })
    }
}

/// The one process that publishes to a segment.
pub struct ShmWriter {
    mapping: Mapping,
    boot_id: [u64; 2],
    // Holds the exclusive lock that keeps a second writer out.
    _file: File,
}

impl ShmWriter {
    /// Publishes at `path` (under `/dev/shm` in production).
    ///
    /// A segment of this version already there is taken over in place, so
    /// that readers which have it mapped go on reading: its data are kept
    /// if they are from this boot and were not left half-written, and
    /// replaced by [`ShmSnapshot::unsynchronized`] otherwise. Anything
    /// else there is replaced whole by a new file (mode 0644) renamed over
    /// it, never truncated: a reader touching a mapped page that a
    /// truncation removed would die of SIGBUS. Fails if another writer
    /// holds the segment (an exclusive `flock`).
    pub fn create(path: &Path) -> io::Result<ShmWriter> {
        let boot_id = boot_id();
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => {
                lock_exclusive(&file, path)?;
                if file.metadata()?.len() == SEGMENT_SIZE as u64 {
                    let mapping = Mapping::new(&file, true)?;
                    if mapping.segment().check_header(path).is_ok() {
                        let writer = ShmWriter {
                            mapping,
                            boot_id,
                            _file: file,
                        };
                        writer.adopt();
                        return Ok(writer);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Self::replace(path, boot_id)
    }

    /// Keeps the data of a segment left by an earlier writer of this boot
    /// (still honest: they age like any other), unless it was mid-update.
    fn adopt(&self) {
        let segment = self.mapping.segment();
        let torn = segment.seq.load(Ordering::Relaxed) & 1 == 1;
        let ours = !torn
            && segment.read().is_ok_and(|raw| {
                raw.boot_id == self.boot_id && raw.boot_id != [0, 0] && raw.check().is_ok()
            });
        if torn || !ours {
            segment.write(&ShmSnapshot::unsynchronized(), self.boot_id);
        }
    }

    /// A fresh segment, complete before it appears at `path`.
    fn replace(path: &Path, boot_id: [u64; 2]) -> io::Result<ShmWriter> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{}' names no file", path.display()),
            )
        })?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let _ = fs::remove_file(&temp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        let result = (|| {
            // The umask may have taken bits away; readers are everyone.
            file.set_permissions(fs::Permissions::from_mode(0o644))?;
            lock_exclusive(&file, path)?;
            file.set_len(SEGMENT_SIZE as u64)?;
            let mapping = Mapping::new(&file, true)?;
            let segment = mapping.segment();
            segment.magic.store(MAGIC_WORD, Ordering::Relaxed);
            segment.version.store(VERSION, Ordering::Relaxed);
            segment.size.store(SEGMENT_SIZE as u32, Ordering::Relaxed);
            segment.write(&ShmSnapshot::unsynchronized(), boot_id);
            // No reader can have it before the rename, which publishes the
            // whole file at once.
            fs::rename(&temp, path)?;
            Ok(mapping)
        })();
        match result {
            Ok(mapping) => Ok(ShmWriter {
                mapping,
                boot_id,
                _file: file,
            }),
            Err(e) => {
                let _ = fs::remove_file(&temp);
                Err(e)
            }
        }
    }

    /// Publishes `snapshot`. Readers see either the previous snapshot or
    /// this one, whole.
    pub fn write(&mut self, snapshot: &ShmSnapshot) {
        self.mapping.segment().write(snapshot, self.boot_id);
    }
}

fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "clock segment '{}' already has a writer (another fient daemon?)",
                path.display()
            ),
        ));
    }
    Err(err)
}

/// A process's view of a segment, read-only. Cheap to share between
/// threads: [`ShmReader::now`] takes `&self`.
pub struct ShmReader {
    mapping: Mapping,
}

impl ShmReader {
    /// Maps the segment at `path` and checks its magic, layout version and
    /// size, and that it was written during this boot.
    pub fn open(path: &Path) -> Result<ShmReader, ShmError> {
        let io_error = |source: io::Error| ShmError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ShmError::NotFound {
                path: path.to_owned(),
            },
            _ => io_error(source),
        })?;
        let len = file.metadata().map_err(io_error)?.len();
        if len < SEGMENT_SIZE as u64 {
            return Err(ShmError::TooSmall {
                path: path.to_owned(),
                found: len,
                needed: SEGMENT_SIZE as u64,
            });
        }
        // The mapping outlives the descriptor, which is closed on return.
        let mapping = Mapping::new(&file, false).map_err(io_error)?;
        let segment = mapping.segment();
        segment.check_header(path)?;
        let ours = boot_id();
        let theirs = segment.read()?.boot_id;
        if ours != [0, 0] && theirs != [0, 0] && ours != theirs {
            return Err(ShmError::OtherBoot {
                path: path.to_owned(),
            });
        }
        Ok(ShmReader { mapping })
    }

    /// The latest snapshot, read whole.
    #[inline]
    pub fn snapshot(&self) -> Result<ShmSnapshot, ShmError> {
        self.mapping.segment().read()?.check()
    }

    /// The true time now, as an interval. The clock is read after the
    /// snapshot, so on one host the age is never negative.
    #[inline]
    pub fn now(&self) -> Result<TimeInterval, ShmError> {
        let snapshot = self.snapshot()?;
        Ok(interval_at(&snapshot, mono_now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2027-01-01T00:00:00Z, a midnight.
    const NEW_YEAR: i64 = 1_798_761_600_000_000_000;
    const S: i64 = 1_000_000_000;

    fn synced(as_of_mono: i64, as_of_real: i64, low: i64, high: i64, ppb: u32) -> ShmSnapshot {
        ShmSnapshot {
            as_of_mono,
            as_of_real: Timestamp::from_nanos(as_of_real),
            offset_low: Nanos::from_nanos(low),
            offset_high: Nanos::from_nanos(high),
            max_drift_ppb: ppb,
            status: Status::Synchronized,
            void_after_mono: i64::MAX,
            leap: Leap::None,
        }
    }

    fn bounds(i: TimeInterval) -> (i64, i64) {
        (i.earliest.as_nanos(), i.latest.as_nanos())
    }

    #[test]
    fn age_zero_is_the_published_interval() {
        let s = synced(5 * S, NEW_YEAR, -300, 700, 50_000);
        let i = interval_at(&s, 5 * S);
        assert_eq!(bounds(i), (NEW_YEAR - 300, NEW_YEAR + 700));
        assert_eq!(i.status, Status::Synchronized);
    }

    #[test]
    fn the_interval_moves_with_age_and_widens_by_the_drift() {
        // 50 ppm over 1 s: 50 µs each side.
        let s = synced(5 * S, NEW_YEAR - 10 * S, -300, 700, 50_000);
        let i = interval_at(&s, 6 * S);
        assert_eq!(
            bounds(i),
            (
                NEW_YEAR - 9 * S - 300 - 50_000,
                NEW_YEAR - 9 * S + 700 + 50_000
            )
        );
    }

    #[test]
    fn widening_rounds_up() {
        // 1 ns at 1 ppb is a billionth of a nanosecond: still 1 ns.
        let s = synced(0, NEW_YEAR, 0, 0, 1);
        assert_eq!(
            bounds(interval_at(&s, 1)),
            (NEW_YEAR + 1 - 1, NEW_YEAR + 1 + 1)
        );
        // No drift, no widening.
        let s = synced(0, NEW_YEAR, 0, 0, 0);
        assert_eq!(
            bounds(interval_at(&s, 123_456)),
            (NEW_YEAR + 123_456, NEW_YEAR + 123_456)
        );
    }

    #[test]
    fn the_fast_widening_agrees_with_the_exact_one() {
        let exact = |age: u128, ppb: u32| (age * u128::from(ppb)).div_ceil(1_000_000_000);
        for ppb in [0, 1, 50_000, 500_000, 999_999_999, u32::MAX] {
            let edge = if ppb == 0 {
                u64::MAX
            } else {
                u64::MAX / u64::from(ppb)
            };
            for age in [
                0,
                1,
                999_999_999,
                edge - 1,
                edge,
                edge.saturating_add(1),
                u64::MAX,
            ] {
                let age = u128::from(age);
                assert_eq!(widening(age, ppb), exact(age, ppb), "{age} {ppb}");
            }
            let beyond = u128::from(u64::MAX) + 1;
            assert_eq!(widening(beyond, ppb), exact(beyond, ppb));
        }
    }

    #[test]
    fn a_large_age_is_exact() {
        // Ten years at 500 ppm.
        let age = 10 * 365 * 86_400 * S;
        let s = synced(0, 0, -1, 1, 500_000);
        let widen = age / 2_000;
        assert_eq!(
            bounds(interval_at(&s, age)),
            (age - 1 - widen, age + 1 + widen)
        );
    }

    #[test]
    fn extremes_saturate_instead_of_wrapping() {
        let s = synced(i64::MIN, i64::MAX, i64::MIN, i64::MAX, u32::MAX);
        let i = interval_at(&s, i64::MAX);
        assert_eq!(bounds(i), (i64::MIN, i64::MAX));
        // An age of -(2^64 - 1) ns at 4.3 s/s widens past every bound...
        let s = synced(i64::MAX, i64::MIN, i64::MIN, i64::MIN, u32::MAX);
        assert_eq!(bounds(interval_at(&s, i64::MIN)), (i64::MIN, i64::MAX));
        // ...and without drift the projection falls off the bottom.
        let s = synced(i64::MAX, i64::MIN, i64::MIN, i64::MIN, 0);
        assert_eq!(bounds(interval_at(&s, i64::MIN)), (i64::MIN, i64::MIN));
        let s = synced(0, i64::MAX - 10, 0, 100, 0);
        assert_eq!(bounds(interval_at(&s, 0)), (i64::MAX - 10, i64::MAX));
    }

    #[test]
    fn a_negative_age_runs_backwards_and_still_widens() {
        // The reader's clock read 1 s before the writer's: the projection
        // goes back 1 s, and the drift bound holds that way too.
        let s = synced(10 * S, NEW_YEAR, -300, 700, 50_000);
        let i = interval_at(&s, 9 * S);
        assert_eq!(
            bounds(i),
            (NEW_YEAR - S - 300 - 50_000, NEW_YEAR - S + 700 + 50_000)
        );
        assert_eq!(i.status, Status::Synchronized);
    }

    #[test]
    fn stale_after_void_or_when_the_writer_says_so() {
        let mut s = synced(0, NEW_YEAR, 0, 0, 0);
        s.void_after_mono = 5 * S;
        assert_eq!(interval_at(&s, 5 * S).status, Status::Synchronized);
        let late = interval_at(&s, 5 * S + 1);
        assert_eq!(late.status, Status::Stale);
        // Stale is still an interval, not a shrug.
        assert_eq!(bounds(late), (NEW_YEAR + 5 * S + 1, NEW_YEAR + 5 * S + 1));
        s.status = Status::Stale;
        assert_eq!(interval_at(&s, 0).status, Status::Stale);
    }

    #[test]
    fn unsynchronized_is_unbounded_whatever_the_fields() {
        let mut s = synced(0, NEW_YEAR, 1, 2, 3);
        s.status = Status::Unsynchronized;
        let i = interval_at(&s, 7);
        assert_eq!(bounds(i), (i64::MIN, i64::MAX));
        assert_eq!(i.status, Status::Unsynchronized);
    }

    #[test]
    fn an_inserted_leap_second_is_followed_exactly() {
        let mut s = synced(0, NEW_YEAR - 10 * S, -100, 100, 0);
        s.leap = Leap::Insert;
        let at = |real: i64| bounds(interval_at(&s, real - (NEW_YEAR - 10 * S)));
        // Before the midnight: untouched.
        assert_eq!(at(NEW_YEAR - S), (NEW_YEAR - S - 100, NEW_YEAR - S + 100));
        // Straddling it: widened back over the repeated second.
        assert_eq!(at(NEW_YEAR), (NEW_YEAR - S, NEW_YEAR - 1));
        assert_eq!(at(NEW_YEAR + 50), (NEW_YEAR - S, NEW_YEAR - 1));
        // Past it: one second less.
        assert_eq!(at(NEW_YEAR + S), (NEW_YEAR - 100, NEW_YEAR + 100));
        // Only the midnight ending as_of_real's day counts.
        assert_eq!(
            at(NEW_YEAR + 86_400 * S),
            (NEW_YEAR + 86_399 * S - 100, NEW_YEAR + 86_399 * S + 100)
        );
    }

    #[test]
    fn a_deleted_leap_second_is_followed_exactly() {
        let mut s = synced(0, NEW_YEAR - 10 * S, -100, 100, 0);
        s.leap = Leap::Delete;
        let at = |real: i64| bounds(interval_at(&s, real - (NEW_YEAR - 10 * S)));
        assert_eq!(
            at(NEW_YEAR - 2 * S),
            (NEW_YEAR - 2 * S - 100, NEW_YEAR - 2 * S + 100)
        );
        // Straddling 23:59:59: the latest jumps the skipped second.
        assert_eq!(at(NEW_YEAR - S), (NEW_YEAR - S - 100, NEW_YEAR + 100));
        // Past it: one second more.
        assert_eq!(at(NEW_YEAR), (NEW_YEAR + S - 100, NEW_YEAR + S + 100));
    }

    #[test]
    fn the_read_time_of_a_clock_pair_lowers_low() {
        let at = ClockPair {
            mono: 100,
            real: Timestamp::from_nanos(NEW_YEAR),
            gap: Nanos::from_nanos(40),
        };
        let s = ShmSnapshot::synchronized(
            at,
            Nanos::from_nanos(-5),
            Nanos::from_nanos(5),
            7,
            Nanos::from_secs(2),
        );
        assert_eq!(s.offset_low, Nanos::from_nanos(-45));
        assert_eq!(s.offset_high, Nanos::from_nanos(5));
        assert_eq!(s.void_after_mono, 100 + 2 * S);
        let pair = ClockPair::read();
        assert!(pair.gap >= Nanos::ZERO && pair.gap < Nanos::from_millis(100));
    }

    fn temp_segment() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock");
        (dir, path)
    }

    #[test]
    fn a_snapshot_round_trips_and_the_file_is_world_readable() {
        let (_dir, path) = temp_segment();
        let mut writer = ShmWriter::create(&path).unwrap();
        let reader = ShmReader::open(&path).unwrap();
        assert_eq!(reader.snapshot().unwrap(), ShmSnapshot::unsynchronized());
        assert_eq!(reader.now().unwrap().status, Status::Unsynchronized);
        let mut s = synced(mono_now(), NEW_YEAR, -3, 4, 5);
        s.leap = Leap::Delete;
        s.void_after_mono = s.as_of_mono + 60 * S;
        writer.write(&s);
        assert_eq!(reader.snapshot().unwrap(), s);
        assert_eq!(reader.now().unwrap().status, Status::Synchronized);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(meta.len(), SEGMENT_SIZE as u64);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let (_dir, path) = temp_segment();
        let _writer = ShmWriter::create(&path).unwrap();
        let err = ShmWriter::create(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains("already has a writer"), "{err}");
    }

    #[test]
    fn a_restarted_writer_keeps_the_segment_and_its_data() {
        let (_dir, path) = temp_segment();
        let s = synced(mono_now(), NEW_YEAR, -3, 4, 5);
        {
            let mut writer = ShmWriter::create(&path).unwrap();
            writer.write(&s);
        }
        let reader = ShmReader::open(&path).unwrap();
        let _writer = ShmWriter::create(&path).unwrap();
        // Same file, same data: readers that had it mapped carry on.
        assert_eq!(reader.snapshot().unwrap(), s);
    }

    #[test]
    fn a_writer_that_died_mid_update_leaves_nothing_trusted() {
        let (_dir, path) = temp_segment();
        {
            let mut writer = ShmWriter::create(&path).unwrap();
            writer.write(&synced(mono_now(), NEW_YEAR, -3, 4, 5));
            let seq = &writer.mapping.segment().seq;
            seq.store(seq.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        let reader = ShmReader::open(&path).err().unwrap();
        assert!(matches!(reader, ShmError::Busy { .. }), "{reader}");
        let _writer = ShmWriter::create(&path).unwrap();
        let reader = ShmReader::open(&path).unwrap();
        assert_eq!(reader.snapshot().unwrap(), ShmSnapshot::unsynchronized());
    }

    #[test]
    fn a_writer_does_not_keep_another_boots_data() {
        let (_dir, path) = temp_segment();
        ShmWriter::create(&path)
            .unwrap()
            .write(&synced(1, NEW_YEAR, 0, 0, 0));
        let mut bytes = fs::read(&path).unwrap();
        bytes[80..96].copy_from_slice(&[0x5a; 16]);
        fs::write(&path, bytes).unwrap();
        let _writer = ShmWriter::create(&path).unwrap();
        let reader = ShmReader::open(&path).unwrap();
        assert_eq!(reader.snapshot().unwrap(), ShmSnapshot::unsynchronized());
    }

    #[test]
    fn a_foreign_file_is_replaced_not_truncated() {
        let (_dir, path) = temp_segment();
        fs::write(&path, b"not a clock").unwrap();
        let mut writer = ShmWriter::create(&path).unwrap();
        writer.write(&synced(mono_now(), NEW_YEAR, 0, 0, 0));
        assert_eq!(fs::metadata(&path).unwrap().len(), SEGMENT_SIZE as u64);
        assert!(ShmReader::open(&path).is_ok());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    /// A valid segment's bytes with `edit` applied at `offset`.
    fn segment_with(offset: usize, edit: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let (dir, path) = temp_segment();
        drop(ShmWriter::create(&path).unwrap());
        let mut bytes = fs::read(&path).unwrap();
        bytes[offset..offset + edit.len()].copy_from_slice(edit);
        fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn readers_name_what_is_wrong() {
        let (_dir, missing) = temp_segment();
        let err = ShmReader::open(&missing).err().unwrap();
        assert!(matches!(err, ShmError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("/clock'"), "{err}");

        let (_dir, path) = segment_with(0, b"CLOCKBND");
        let err = ShmReader::open(&path).err().unwrap();
        assert!(matches!(err, ShmError::WrongMagic { .. }), "{err}");

        let (_dir, path) = segment_with(8, &2u32.to_ne_bytes());
        match ShmReader::open(&path) {
            Err(ShmError::NewerVersion {
                found: 2,
                supported: 1,
                ..
            }) => {}
            other => panic!("{:?}", other.err()),
        }

        let (_dir, path) = segment_with(8, &0u32.to_ne_bytes());
        let err = ShmReader::open(&path).err().unwrap();
        assert!(
            matches!(err, ShmError::OlderVersion { found: 0, .. }),
            "{err}"
        );

        let (_dir, path) = segment_with(12, &128u32.to_ne_bytes());
        let err = ShmReader::open(&path).err().unwrap();
        assert!(
            matches!(err, ShmError::TooSmall { found: 128, .. }),
            "{err}"
        );

        let (_dir, path) = temp_segment();
        fs::write(&path, [0u8; 100]).unwrap();
        let err = ShmReader::open(&path).err().unwrap();
        assert!(
            matches!(err, ShmError::TooSmall { found: 100, .. }),
            "{err}"
        );

        let (_dir, path) = segment_with(80, &[0x5a; 16]);
        let err = ShmReader::open(&path).err().unwrap();
        assert!(matches!(err, ShmError::OtherBoot { .. }), "{err}");

        let (_dir, path) = segment_with(60, &7u32.to_ne_bytes());
        let reader = ShmReader::open(&path).unwrap();
        let err = reader.now().err().unwrap();
        assert!(
            matches!(
                err,
                ShmError::Malformed {
                    field: "status",
                    value: 7
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn the_boot_id_is_this_boots() {
        let id = boot_id();
        assert_ne!(id, [0, 0]);
        let text = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        let first = u8::from_str_radix(&text[..2], 16).unwrap();
        assert_eq!(id[0].to_ne_bytes()[0], first);
    }
}
