//! The network conditions the lab measures under (see `DESIGN.md`), and the
//! spec language for the `relay` binary.

use crate::relay::{Direction, Impairment, Jitter};
use std::time::Duration;

/// A named condition. `impairment: None` means no relay at all: fient talks
/// to cerv directly, which shows the floor set by our own software.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Short name, used on the command line.
    pub name: &'static str,
    /// What it shows.
    pub about: &'static str,
    /// The relay's settings, or none for a direct path.
    pub impairment: Option<Impairment>,
    /// The error any two-way method must make here (half the asymmetry of
    /// the mean delays); the estimate should sit this far from the truth.
    pub expected_error: Duration,
}

fn ms(x: f64) -> Duration {
    Duration::from_secs_f64(x / 1e3)
}

/// Every scenario, in report order.
pub fn all() -> Vec<Scenario> {
    let sym = Direction::delay(ms(1.0)).jitter(Jitter::Uniform(ms(0.1)));
    vec![
        Scenario {
            name: "lan",
            about: "nothing added: the floor set by our own software",
            impairment: None,
            expected_error: Duration::ZERO,
        },
        Scenario {
            name: "sym",
            about: "1 ms ± 0.1 ms each way: plain delay is removed exactly",
            impairment: Some(Impairment::symmetric(sym)),
            expected_error: Duration::ZERO,
        },
        Scenario {
            name: "asym",
            about: "3 ms out, 0.5 ms back: off by half the asymmetry, inside the bound",
            impairment: Some(Impairment {
                to_server: Direction::delay(ms(3.0)),
                to_client: Direction::delay(ms(0.5)),
            }),
            expected_error: ms(1.25),
        },
        Scenario {
            name: "lossy",
            about: "1 ms each way, 20 % loss each way: loss costs little time",
            impairment: Some(Impairment::symmetric(Direction::delay(ms(1.0)).loss(0.2))),
            expected_error: Duration::ZERO,
        },
        Scenario {
            name: "jitter",
            about: "2 ms ± 1.5 ms (normal) each way: the estimator picks quiet samples",
            impairment: Some(Impairment::symmetric(
                Direction::delay(ms(2.0)).jitter(Jitter::Normal(ms(1.5))),
            )),
            expected_error: Duration::ZERO,
        },
        Scenario {
            name: "dup",
            about: "1 ms ± 0.1 ms, 30 % duplicated and 30 % reordered each way: harmless",
            impairment: Some(Impairment::symmetric(sym.duplicate(0.3).reorder(0.3))),
            expected_error: Duration::ZERO,
        },
    ]
}

/// Finds a scenario by name.
pub fn named(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

/// Parses a direction spec such as `delay=2ms,jitter=0.1ms,loss=0.2`.
///
/// Keys: `delay`, `jitter` (uniform ±), `normal` (standard deviation),
/// `loss`, `dup`, `reorder` (shares from 0 to 1), `hold` (extra delay of a
/// reordered datagram). Durations as `fient` takes them (`250us`, `1.5ms`).
pub fn parse_direction(spec: &str) -> Result<Direction, String> {
    let mut d = Direction::CLEAN;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("invalid spec '{part}': expected key=value"))?;
        let duration = || -> Result<Duration, String> {
            let n: service::Nanos = value
                .parse()
                .map_err(|e: service::time::ParseError| e.to_string())?;
            if n.is_negative() {
                return Err(format!("invalid {key} '{value}': must not be negative"));
            }
            Ok(n.unsigned_duration())
        };
        let share = || -> Result<f64, String> {
            let p: f64 = value.trim_end_matches('%').parse().map_err(|_| {
                format!("invalid {key} '{value}': expected a share such as 0.2 or 20%")
            })?;
            let p = if value.ends_with('%') { p / 100.0 } else { p };
            if (0.0..=1.0).contains(&p) {
                Ok(p)
            } else {
                Err(format!("invalid {key} '{value}': must be between 0 and 1"))
            }
        };
        match key {
            "delay" => d.delay = duration()?,
            "jitter" => d.jitter = Jitter::Uniform(duration()?),
            "normal" => d.jitter = Jitter::Normal(duration()?),
            "loss" => d.loss = share()?,
            "dup" => d.duplicate = share()?,
            "reorder" => d.reorder = share()?,
            "hold" => d.reorder_hold = duration()?,
            other => return Err(format!("unknown key '{other}' in '{spec}'")),
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let d = parse_direction("delay=2ms, normal=1.5ms, loss=20%, dup=0.1").unwrap();
        assert_eq!(d.delay, ms(2.0));
        assert_eq!(d.jitter, Jitter::Normal(ms(1.5)));
        assert!((d.loss - 0.2).abs() < 1e-9);
        assert!((d.duplicate - 0.1).abs() < 1e-9);
        assert_eq!(parse_direction("").unwrap(), Direction::CLEAN);
        for bad in ["delay", "delay=soon", "loss=2", "color=red", "delay=-1ms"] {
            assert!(parse_direction(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scenarios_are_named_uniquely() {
        let names: Vec<_> = all().iter().map(|s| s.name).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names, unique);
        assert!(named("asym").is_some());
        assert!(named("mars").is_none());
    }
}
