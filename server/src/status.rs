//! `cerv status`: what a running cerv says of itself.
//!
//! ```text
//! cerv 0.1.0 (pid 4242), up 2h03m
//! Clock           : stratum 2 (the kernel says it is synchronised)
//! Served          : 120345 replies, 12 dropped
//! Configuration   : loaded 2026-11-25T17:00:00Z (1 reload, 0 failed)
//!
//! WIRE    ADDRESS               RECEIVED     REPLIED    CONNS  DROPS
//! cerv    127.0.0.1:8081          100022      100010        -  malformed 12
//! ntp     0.0.0.0:123              20335       20335        -  -
//! ```

use service::control::{ServerStatus, short_duration};
use std::io::{self, Write};

/// Writes the status as a summary and a table of sockets.
pub fn write_human(out: &mut dyn Write, s: &ServerStatus) -> io::Result<()> {
    writeln!(
        out,
        "cerv {} (pid {}), up {}",
        s.version,
        s.pid,
        short_duration(s.uptime_ns)
    )?;
    let kernel = if s.kernel_synchronized {
        "the kernel says it is synchronised"
    } else {
        "the kernel says it is not synchronised"
    };
    match s.stratum {
        16 => writeln!(
            out,
            "Clock           : unsynchronised, served as stratum 16 ({kernel})"
        )?,
        n => writeln!(out, "Clock           : stratum {n} ({kernel})")?,
    }
    writeln!(
        out,
        "Served          : {} replies, {} dropped",
        s.served(),
        s.dropped()
    )?;
    writeln!(
        out,
        "Configuration   : loaded {} ({} reload{}, {} failed)",
        s.loaded_at,
        s.reloads,
        if s.reloads == 1 { "" } else { "s" },
        s.reload_failures
    )?;
    writeln!(out)?;
    let width = s
        .faces
        .iter()
        .map(|f| f.address.len())
        .max()
        .unwrap_or(7)
        .max(7);
    writeln!(
        out,
        "{:<6}  {:<width$}  {:>10}  {:>10}  {:>7}  DROPS, EVENTS",
        "WIRE", "ADDRESS", "RECEIVED", "REPLIED", "CONNS"
    )?;
    for f in &s.faces {
        let mut notes: Vec<String> = f
            .drops
            .iter()
            .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
            .collect();
        notes.extend(
            f.events
                .iter()
                .map(|(k, v)| format!("{} {v}", k.replace('_', " "))),
        );
        writeln!(
            out,
            "{:<6}  {:<width$}  {:>10}  {:>10}  {:>7}  {}",
            f.wire,
            f.address,
            f.received,
            f.replied,
            f.connections.map_or("-".into(), |c| c.to_string()),
            if notes.is_empty() {
                "-".to_string()
            } else {
                notes.join(", ")
            }
        )?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use service::control::FaceStatus;

    #[test]
    fn the_view_sums_the_sockets() {
        let s = ServerStatus {
            version: "0.1.0".into(),
            pid: 9,
            uptime_ns: 7_380_000_000_000,
            stratum: 3,
            kernel_synchronized: false,
            faces: vec![
                FaceStatus {
                    wire: "cerv".into(),
                    address: "127.0.0.1:8081".into(),
                    received: 110,
                    replied: 100,
                    drops: [("malformed".to_string(), 10)].into(),
                    ..FaceStatus::default()
                },
                FaceStatus {
                    wire: "tls".into(),
                    address: "127.0.0.1:8443".into(),
                    received: 5,
                    replied: 5,
                    connections: Some(2),
                    drops: [("handshake_failed".to_string(), 1)].into(),
                    ..FaceStatus::default()
                },
            ],
            loaded_at: "2026-11-25T17:00:00Z".into(),
            reloads: 1,
            ..ServerStatus::default()
        };
        let mut out = Vec::new();
        write_human(&mut out, &s).unwrap();
        let text = String::from_utf8(out).unwrap();
        for want in [
            "cerv 0.1.0 (pid 9), up 2h03m",
            "Clock           : stratum 3 (the kernel says it is not synchronised)",
            "Served          : 105 replies, 11 dropped",
            "(1 reload, 0 failed)",
            "malformed 10",
            "handshake failed 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
