//! Time values: [`Timestamp`] (a point in time) and [`Nanos`] (a signed span).
//!
//! Both are integer nanoseconds in an `i64`. A timestamp counts from the Unix
//! epoch in UTC, which covers the years 1677 to 2262: enough for a clock
//! service, and exact, which `f64` seconds are not (an `f64` near today's
//! epoch value resolves only about 0.2 µs). Calendar work (RFC 3339 display
//! and parsing of human durations) is delegated to `jiff`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: nanoseconds since 1970-01-01T00:00:00Z.
///
/// Displayed in RFC 3339 with nine fractional digits, for example
/// `2026-11-24T21:00:00.250000000Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

/// A signed span of time in nanoseconds: an offset, a delay or a round trip.
///
/// Displayed with a unit chosen for the magnitude, for example `250.000ms`,
/// `-1.500s` or `12.345µs` (`{:+}` adds the sign, `{:#}` every digit). Parsed from forms such as
/// `250ms`, `+250ms`, `-1.5s`, `2us` or an ISO 8601 duration (`PT0.25S`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(i64);

/// A value outside what an `i64` of nanoseconds can hold (about ±292 years).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("time value out of range (more than about 292 years from the epoch)")]
pub struct OutOfRange;

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// A timestamp `nanos` nanoseconds after the Unix epoch.
    pub const fn from_nanos(nanos: i64) -> Self {
        Timestamp(nanos)
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// `self - earlier`, exact.
    ///
    /// Two `i64` timestamps can be up to 2^64 ns apart, which does not fit a
    /// [`Nanos`]; callers doing arithmetic over several differences should
    /// work in `i128` through this.
    pub const fn diff_i128(self, earlier: Timestamp) -> i128 {
        self.0 as i128 - earlier.0 as i128
    }

    /// `self - earlier`, or `None` if the difference does not fit.
    pub fn checked_since(self, earlier: Timestamp) -> Option<Nanos> {
        self.0.checked_sub(earlier.0).map(Nanos)
    }

    /// `self + by`, or `None` outside the representable range.
    pub fn checked_add(self, by: Nanos) -> Option<Timestamp> {
        self.0.checked_add(by.0).map(Timestamp)
    }

    /// `self + by`, clamped to the representable range.
    pub fn saturating_add(self, by: Nanos) -> Timestamp {
        Timestamp(self.0.saturating_add(by.0))
    }

    /// Converts from the standard library's clock value.
    pub fn from_system_time(time: SystemTime) -> Result<Self, OutOfRange> {
        let nanos: i128 = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => after.as_nanos() as i128,
            Err(before) => -(before.duration().as_nanos() as i128),
        };
        i64::try_from(nanos).map(Timestamp).map_err(|_| OutOfRange)
    }

    /// Converts to the standard library's clock value.
    pub fn to_system_time(self) -> SystemTime {
        let magnitude = Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            UNIX_EPOCH - magnitude
        }
    }

    fn to_jiff(self) -> jiff::Timestamp {
        // Every i64 of nanoseconds (years 1677..2262) lies inside jiff's range
        // (years -9999..9999), so this conversion cannot fail.
        jiff::Timestamp::from_nanosecond(i128::from(self.0)).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
    }

    /// The time of day in UTC as `HH:MM:SS.nnnnnnnnn`, for compact tables.
    pub fn time_of_day(self) -> impl fmt::Display {
        struct TimeOfDay(jiff::Timestamp);
        impl fmt::Display for TimeOfDay {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let t = self.0.to_zoned_datetime(jiff::tz::TimeZone::UTC).time();
                write!(
                    f,
                    "{:02}:{:02}:{:02}.{:09}",
                    t.hour(),
                    t.minute(),
                    t.second(),
                    t.subsec_nanosecond()
                )
            }
        }
        TimeOfDay(self.to_jiff())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.9}", self.to_jiff())
    }
}

impl FromStr for Timestamp {
    type Err = ParseError;

    /// Parses an RFC 3339 timestamp such as `2026-11-24T21:00:00.25Z`.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let t: jiff::Timestamp = s.parse().map_err(|_| ParseError::timestamp(s))?;
        i64::try_from(t.as_nanosecond())
            .map(Timestamp)
            .map_err(|_| ParseError::timestamp(s))
    }
}

impl Nanos {
    /// Zero.
    pub const ZERO: Nanos = Nanos(0);
    /// The largest representable span.
    pub const MAX: Nanos = Nanos(i64::MAX);

    /// A span of `nanos` nanoseconds.
    pub const fn from_nanos(nanos: i64) -> Self {
        Nanos(nanos)
    }
    /// A span of `micros` microseconds (saturating).
    pub const fn from_micros(micros: i64) -> Self {
        Nanos(micros.saturating_mul(1_000))
    }
    /// A span of `millis` milliseconds (saturating).
    pub const fn from_millis(millis: i64) -> Self {
        Nanos(millis.saturating_mul(1_000_000))
    }
    /// A span of `secs` seconds (saturating).
    pub const fn from_secs(secs: i64) -> Self {
        Nanos(secs.saturating_mul(1_000_000_000))
    }

    /// The span in nanoseconds.
    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// The magnitude of the span.
    pub const fn abs(self) -> Nanos {
        Nanos(self.0.saturating_abs())
    }

    /// True for spans below zero.
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// `self + other`, clamped to the representable range.
    pub const fn saturating_add(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(other.0))
    }

    /// `self - other`, clamped to the representable range.
    pub const fn saturating_sub(self, other: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(other.0))
    }

    /// Converts an exact `i128` result of the sync math, failing if it does
    /// not fit.
    pub fn try_from_i128(nanos: i128) -> Result<Nanos, OutOfRange> {
        i64::try_from(nanos).map(Nanos).map_err(|_| OutOfRange)
    }

    /// The magnitude as a standard `Duration` (for timers).
    pub fn unsigned_duration(self) -> Duration {
        Duration::from_nanos(self.0.unsigned_abs())
    }

    /// Converts a standard `Duration`, saturating at [`Nanos::MAX`].
    pub fn from_duration(d: Duration) -> Nanos {
        Nanos(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

impl fmt::Display for Nanos {
    /// `250.000ms`, `-1.500s`, `12.345µs`, `0ns`: three decimals in a unit
    /// chosen so that the integer part is below 1000. Flags: `{:+}` always
    /// shows the sign, `{:#}` shows every digit down to the nanosecond, and
    /// a precision (`{:.1}`) sets the number of decimals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match (self.0 < 0, f.sign_plus()) {
            (true, _) => "-",
            (false, true) => "+",
            (false, false) => "",
        };
        let magnitude = self.0.unsigned_abs();
        let (unit, scale, digits) = match magnitude {
            0..1_000 => ("ns", 1u64, 0),
            1_000..1_000_000 => ("µs", 1_000, 3),
            1_000_000..1_000_000_000 => ("ms", 1_000_000, 6),
            _ => ("s", 1_000_000_000, 9),
        };
        if scale == 1 {
            return write!(f, "{sign}{magnitude}ns");
        }
        let decimals = match f.precision() {
            Some(p) => p.min(9),
            None if f.alternate() => digits,
            None => 3,
        };
        // Integer arithmetic, rounded half up, so that display never goes
        // through f64.
        let step = 10u64.pow(decimals as u32);
        let scaled =
            (u128::from(magnitude) * u128::from(step) + u128::from(scale) / 2) / u128::from(scale);
        let whole = scaled / u128::from(step);
        let frac = scaled % u128::from(step);
        if decimals == 0 {
            write!(f, "{sign}{whole}{unit}")
        } else {
            write!(f, "{sign}{whole}.{frac:0width$}{unit}", width = decimals)
        }
    }
}

impl FromStr for Nanos {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let trimmed = s.trim();
        if trimmed.trim_start_matches(['+', '-']) == "0" {
            return Ok(Nanos::ZERO);
        }
        let parsed: jiff::SignedDuration = trimmed.parse().map_err(|_| ParseError::duration(s))?;
        i64::try_from(parsed.as_nanos())
            .map(Nanos)
            .map_err(|_| ParseError::duration(s))
    }
}

/// A time value that could not be parsed; the message names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} '{input}': expected {expected}")]
pub struct ParseError {
    what: &'static str,
    input: String,
    expected: &'static str,
}

impl ParseError {
    fn duration(input: &str) -> Self {
        ParseError {
            what: "duration",
            input: input.to_owned(),
            expected: "a number with a unit, such as 250ms, -1.5s or 20us",
        }
    }
    fn timestamp(input: &str) -> Self {
        ParseError {
            what: "timestamp",
            input: input.to_owned(),
            expected: "an RFC 3339 time such as 2026-11-24T21:00:00Z",
        }
    }
}

impl std::ops::Neg for Nanos {
    type Output = Nanos;
    fn neg(self) -> Nanos {
        Nanos(self.0.saturating_neg())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_rfc3339_with_nanoseconds() {
        assert_eq!(
            Timestamp::EPOCH.to_string(),
            "1970-01-01T00:00:00.000000000Z"
        );
        let t = Timestamp::from_nanos(1_795_986_000_250_000_001);
        assert_eq!(t.to_string(), "2026-11-29T21:00:00.250000001Z");
        assert_eq!(t.time_of_day().to_string(), "21:00:00.250000001");
        let before = Timestamp::from_nanos(-1);
        assert_eq!(before.to_string(), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn extreme_timestamps_display() {
        assert!(
            Timestamp::from_nanos(i64::MIN)
                .to_string()
                .starts_with("1677-")
        );
        assert!(
            Timestamp::from_nanos(i64::MAX)
                .to_string()
                .starts_with("2262-")
        );
    }

    #[test]
    fn parses_rfc3339() {
        let t: Timestamp = "2026-11-29T21:00:00.250000001Z".parse().unwrap();
        assert_eq!(t.as_nanos(), 1_795_986_000_250_000_001);
        assert!("yesterday".parse::<Timestamp>().is_err());
        assert!("3000-01-01T00:00:00Z".parse::<Timestamp>().is_err());
    }

    #[test]
    fn system_time_round_trips() {
        for nanos in [0, 1, -1, 1_700_000_000_123_456_789, -86_400_000_000_007] {
            let t = Timestamp::from_nanos(nanos);
            assert_eq!(Timestamp::from_system_time(t.to_system_time()), Ok(t));
        }
    }

    #[test]
    fn nanos_display_picks_a_unit() {
        let cases = [
            (0, "0ns"),
            (999, "999ns"),
            (-1_000, "-1.000µs"),
            (12_345, "12.345µs"),
            (250_000_000, "250.000ms"),
            (-1_500_000_000, "-1.500s"),
            (999_999_999, "1000.000ms"),
            (1_234_567_890_123, "1234.568s"),
        ];
        for (nanos, want) in cases {
            assert_eq!(Nanos::from_nanos(nanos).to_string(), want, "{nanos}");
        }
        assert_eq!(format!("{:.1}", Nanos::from_nanos(12_345)), "12.3µs");
        assert_eq!(format!("{:.0}", Nanos::from_millis(3)), "3ms");
        assert_eq!(format!("{:+}", Nanos::from_millis(3)), "+3.000ms");
        assert_eq!(format!("{:+}", Nanos::from_millis(-3)), "-3.000ms");
        assert_eq!(
            format!("{:+#}", Nanos::from_nanos(250_000_123)),
            "+250.000123ms"
        );
        assert_eq!(
            format!("{:#}", Nanos::from_nanos(-1_000_000_001)),
            "-1.000000001s"
        );
        assert_eq!(Nanos::from_nanos(i64::MIN).to_string(), "-9223372036.855s");
    }

    #[test]
    fn nanos_parse_human_forms() {
        let ok = [
            ("250ms", 250_000_000),
            ("+250ms", 250_000_000),
            ("-1.5s", -1_500_000_000),
            ("20us", 20_000),
            ("20µs", 20_000),
            ("1s 500ms", 1_500_000_000),
            ("PT0.25S", 250_000_000),
            ("0", 0),
            ("-0", 0),
            ("7ns", 7),
        ];
        for (input, want) in ok {
            assert_eq!(
                input.parse::<Nanos>(),
                Ok(Nanos::from_nanos(want)),
                "{input}"
            );
        }
        for bad in ["", "ms", "12", "5 parsecs", "++1s", "1e400s"] {
            let err = bad.parse::<Nanos>().unwrap_err();
            assert!(err.to_string().contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn differences_are_exact_and_checked() {
        let a = Timestamp::from_nanos(i64::MAX);
        let b = Timestamp::from_nanos(i64::MIN);
        assert_eq!(a.diff_i128(b), u64::MAX as i128);
        assert_eq!(a.checked_since(b), None);
        assert_eq!(
            Timestamp::from_nanos(10).checked_since(Timestamp::from_nanos(3)),
            Some(Nanos::from_nanos(7))
        );
        assert_eq!(a.checked_add(Nanos::from_nanos(1)), None);
        assert_eq!(a.saturating_add(Nanos::from_nanos(1)), a);
    }
}
