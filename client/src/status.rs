//! `fient status`: what a running fient daemon knows, as chrony's
//! `tracking` and `sources` show it.
//!
//! ```text
//! Reference       : ntp://127.0.0.1:123, 127.0.0.1:8081 (2 of 3 agree)
//! Last update     : 2026-11-25T17:10:03.512Z (3.2s ago)
//! Offset          : +12.345µs ± 4.200µs (± 4.520µs now, widening 100 ppm)
//! Frequency       : +41.203 ppm ± 0.050 (this clock runs fast; from the filter)
//! ...
//! SOURCE                    WIRE  STATUS        REACH  OFFSET      ± BOUND     RTT        LAST
//! ntp://127.0.0.1:123       ntp   selected      377    +12.301µs   4.2µs       61.0µs     3.2s
//! ```

use service::control::{ClientStatus, short_duration};
use service::time::Nanos;
use std::io::{self, Write};

/// Writes the tracking view and the sources table.
pub fn write_human(out: &mut dyn Write, s: &ClientStatus) -> io::Result<()> {
    let ns = |n: i64| format!("{}", Nanos::from_nanos(n));
    let signed = |n: i64| format!("{:+#}", Nanos::from_nanos(n));
    writeln!(
        out,
        "fient {} (pid {}), up {}, {}",
        s.version,
        s.pid,
        short_duration(s.uptime_ns),
        if s.correcting {
            "correcting the clock"
        } else {
            "reporting only"
        }
    )?;
    match &s.tracking {
        None => writeln!(out, "Tracking        : not synchronised yet")?,
        Some(t) => {
            writeln!(
                out,
                "Reference       : {} ({} of {} agree)",
                t.reference.join(", "),
                t.agreeing,
                t.answered
            )?;
            writeln!(
                out,
                "Last update     : {} ({} ago)",
                t.reference_time,
                short_duration(t.age_ns)
            )?;
            writeln!(
                out,
                "Offset          : {} ± {} (± {} now, widening {} ppm)",
                signed(t.offset_ns),
                ns(t.bound_ns),
                ns(t.bound_now_ns),
                t.max_drift_ppm
            )?;
            match (t.frequency_ppm, t.frequency_uncertainty_ppm) {
                (Some(f), u) => {
                    let u = u.unwrap_or(0.0);
                    let runs = if f.abs() <= u {
                        "this clock's rate is right within that"
                    } else if f > 0.0 {
                        "this clock runs fast"
                    } else {
                        "this clock runs slow"
                    };
                    let from = t.frequency_from.as_deref().unwrap_or("filter");
                    writeln!(
                        out,
                        "Frequency       : {f:+.3} ppm ± {u:.3} ({runs}; from the {})",
                        from.replace('_', " ")
                    )?
                }
                (None, _) => writeln!(out, "Frequency       : measuring")?,
            }
            if let Some(c) = t.frequency_correction_ppm {
                writeln!(out, "Correction      : {c:+.3} ppm set")?;
            }
            writeln!(out, "Leap            : {}", t.leap)?;
            if let Some(st) = t.stratum {
                writeln!(out, "Stratum         : {st}")?;
            }
        }
    }
    let syncs: Vec<String> = s.syncs.iter().map(|(k, v)| format!("{v} {k}")).collect();
    writeln!(
        out,
        "Rounds          : {} (next in {})",
        if syncs.is_empty() {
            "none yet".to_string()
        } else {
            syncs.join(", ").replace('_', " ")
        },
        short_duration(s.next_poll_ns)
    )?;
    if let Some(p) = &s.shm {
        writeln!(out, "Publishing to   : {}", p.display())?;
    }
    if let Some(p) = &s.drift_file {
        writeln!(out, "Drift file      : {}", p.display())?;
    }
    writeln!(out)?;
    let width = s
        .sources
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    writeln!(
        out,
        "{:<width$}  {:<4}  {:<14}  {:>5}  {:>14}  {:>10}  {:>10}  {:>7}",
        "SOURCE", "WIRE", "STATUS", "REACH", "OFFSET", "± BOUND", "RTT", "LAST"
    )?;
    for r in &s.sources {
        let dash = || "-".to_string();
        writeln!(
            out,
            "{:<width$}  {:<4}  {:<14}  {:>5o}  {:>14}  {:>10}  {:>10}  {:>7}",
            r.name,
            r.wire,
            r.status.replace('_', " "),
            r.reach,
            r.offset_ns.map_or_else(dash, signed),
            r.bound_ns.map_or_else(dash, ns),
            r.rtt_ns.map_or_else(dash, ns),
            r.last_answer_age_ns.map_or_else(dash, short_duration),
        )?;
        if let Some(e) = &r.error {
            writeln!(out, "{:<width$}  └ {e}", "")?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use service::control::{SourceRow, Tracking};

    #[test]
    fn the_view_shows_tracking_and_sources() {
        let s = ClientStatus {
            version: "0.1.0".into(),
            pid: 42,
            uptime_ns: 125_000_000_000,
            tracking: Some(Tracking {
                reference: vec!["ntp://127.0.0.1:123".into()],
                reference_time: "2026-11-25T17:10:03.512Z".into(),
                age_ns: 3_200_000_000,
                offset_ns: 12_345,
                bound_ns: 4_200,
                bound_now_ns: 4_520,
                max_drift_ppm: 100,
                frequency_ppm: Some(41.203),
                frequency_uncertainty_ppm: Some(0.05),
                frequency_from: Some("filter".into()),
                leap: "normal".into(),
                stratum: Some(3),
                agreeing: 1,
                answered: 2,
                ..Tracking::default()
            }),
            sources: vec![
                SourceRow {
                    name: "ntp://127.0.0.1:123".into(),
                    wire: "ntp".into(),
                    status: "selected".into(),
                    reach: 0o377,
                    offset_ns: Some(12_301),
                    bound_ns: Some(4_200),
                    rtt_ns: Some(61_000),
                    last_answer_age_ns: Some(3_200_000_000),
                    ..SourceRow::default()
                },
                SourceRow {
                    name: "127.0.0.9:8081".into(),
                    wire: "cerv".into(),
                    status: "no_answer".into(),
                    reach: 0o376,
                    error: Some("no answer from 127.0.0.9:8081".into()),
                    ..SourceRow::default()
                },
            ],
            ..ClientStatus::default()
        };
        let mut out = Vec::new();
        write_human(&mut out, &s).unwrap();
        let text = String::from_utf8(out).unwrap();
        for want in [
            "fient 0.1.0 (pid 42), up 2m05s, reporting only",
            "Reference       : ntp://127.0.0.1:123 (1 of 2 agree)",
            "(3.2s ago)",
            "Offset          : +12.345µs ± 4.200µs (± 4.520µs now",
            "Frequency       : +41.203 ppm ± 0.050 (this clock runs fast; from the filter)",
            "Stratum         : 3",
            "selected",
            "  377  ",
            "  376  ",
            "no answer from 127.0.0.9:8081",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
