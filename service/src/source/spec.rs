//! A source as a user writes it: `ntp://host:port`, `host:port`, and the
//! address it resolves to.
//!
//! | written | wire | default port |
//! |---|---|---|
//! | `host[:port]`, `cerv://host[:port]` | cerv's tarpc wire over UDP | 8081 |
//! | `ntp://host[:port]` | NTP (v4) | 123 |
//! | `tcp://host[:port]` | cerv's tarpc wire over TCP | 8081 |
//! | `tls://host[:port]` | cerv's tarpc wire over TLS | 8443 |
//! | `nts://host[:port]` | NTP with NTS (the port is the key exchange's) | 4460 |
//!
//! Hosts are names, IPv4 addresses or IPv6 addresses (bracketed when a
//! port follows: `[::1]:8081`, `ntp://[::1]:123`).
//!
//! **Pools.** `pool:` in front (`pool:ntp://pool.example.org`) makes every
//! address the name resolves to a source of its own (up to
//! [`POOL_MAX`]), as chrony's `pool` directive does; without it a name is
//! one source, its first address.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;

/// The most addresses a pool contributes (chrony's default `maxsources`).
pub const POOL_MAX: usize = 4;

/// How names become addresses: the system's resolver, or another (a test's
/// table of names).
pub trait Resolve: Send + Sync {
    /// Every address `host` has, with `port`.
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system's resolver (`getaddrinfo`, through Tokio).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// The protocol a source speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wire {
    /// cerv's tarpc service over UDP (`docs/PROTOCOL.md`).
    Cerv,
    /// NTP, client mode (RFC 5905).
    Ntp,
    /// cerv's tarpc service over TCP: Cristian's algorithm on a connection.
    Tcp,
    /// cerv's tarpc service over TLS: a server that proves who it is.
    Tls,
    /// NTP protected by NTS: a key exchange, then authenticated NTP.
    Nts,
}

impl Wire {
    /// Every wire, in the order help texts list them.
    pub const ALL: [Wire; 5] = [Wire::Cerv, Wire::Ntp, Wire::Tcp, Wire::Tls, Wire::Nts];

    /// The scheme that names it (`ntp` in `ntp://host`).
    pub fn scheme(self) -> &'static str {
        match self {
            Wire::Cerv => "cerv",
            Wire::Ntp => "ntp",
            Wire::Tcp => "tcp",
            Wire::Tls => "tls",
            Wire::Nts => "nts",
        }
    }

    /// The port a source of this wire uses when none is written.
    pub fn default_port(self) -> u16 {
        match self {
            Wire::Cerv | Wire::Tcp => 8081,
            Wire::Ntp => 123,
            Wire::Tls => 8443,
            Wire::Nts => crate::nts::ke::PORT,
        }
    }

    /// Whether the wire is a connection (one per sync) rather than
    /// datagrams.
    pub fn is_stream(self) -> bool {
        matches!(self, Wire::Tcp | Wire::Tls)
    }
}

impl fmt::Display for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

/// A source as written: a wire, a host and a port, not yet resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SourceSpec {
    /// The protocol.
    pub wire: Wire,
    /// A name or an address (without brackets).
    pub host: String,
    /// The port (the wire's default when none was written).
    pub port: u16,
    /// Every address of the name is a source (`pool:`).
    pub pool: bool,
}

/// A source that cannot be used; the message names the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot resolve server address '{input}': {reason}")]
pub struct AddressError {
    input: String,
    reason: String,
}

impl AddressError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        AddressError {
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

impl FromStr for SourceSpec {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<SourceSpec, AddressError> {
        let trimmed = input.trim();
        let (pool, trimmed) = match trimmed.get(..5) {
            Some(p) if p.eq_ignore_ascii_case("pool:") => (true, &trimmed[5..]),
            _ => (false, trimmed),
        };
        let (wire, rest) = match trimmed.split_once("://") {
            None => (Wire::Cerv, trimmed),
            Some((scheme, rest)) => {
                let wire = Wire::ALL
                    .into_iter()
                    .find(|w| w.scheme().eq_ignore_ascii_case(scheme))
                    .ok_or_else(|| {
                        let known: Vec<String> =
                            Wire::ALL.iter().map(|w| format!("{w}://")).collect();
                        AddressError::new(
                            input,
                            format!(
                                "unknown scheme '{scheme}://' (expected {})",
                                known.join(", ")
                            ),
                        )
                    })?;
                (wire, rest)
            }
        };
        if rest.is_empty() {
            return Err(AddressError::new(input, "empty address"));
        }
        let bad_port = |port: &str| {
            AddressError::new(
                input,
                format!("invalid port '{port}' (expected 1 to 65535)"),
            )
        };
        // [v6]:port, [v6], a bare v6 address, host:port, host.
        let (host, port) = if let Some(after) = rest.strip_prefix('[') {
            let (host, tail) = after
                .split_once(']')
                .ok_or_else(|| AddressError::new(input, "unclosed '['"))?;
            let port = match tail {
                "" => wire.default_port(),
                t => {
                    let p = t.strip_prefix(':').ok_or_else(|| bad_port(t))?;
                    p.parse().map_err(|_| bad_port(p))?
                }
            };
            (host, port)
        } else if rest.parse::<IpAddr>().is_ok() {
            (rest, wire.default_port())
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad_port(port))?),
                None => (rest, wire.default_port()),
            }
        };
        if host.is_empty()
            || host.contains(['/', ':', '[', ']']) && host.parse::<IpAddr>().is_err()
            || host.contains(char::is_whitespace)
        {
            return Err(AddressError::new(input, "invalid host name"));
        }
        if port == 0 {
            return Err(AddressError::new(input, "port 0 is not a server port"));
        }
        Ok(SourceSpec {
            wire,
            host: host.to_owned(),
            port,
            pool,
        })
    }
}

impl fmt::Display for SourceSpec {
    /// `ntp://[::1]:123`; the cerv wire without a scheme, as it is
    /// usually written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pool {
            f.write_str("pool:")?;
        }
        if self.wire != Wire::Cerv {
            write!(f, "{}://", self.wire)?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl SourceSpec {
    /// Every address the host resolves to (a name may have several, as a
    /// pool does), with unusable ones refused by name.
    pub async fn resolve_all(&self) -> Result<Vec<SocketAddr>, AddressError> {
        self.resolve_all_with(&SystemResolver).await
    }

    /// Like [`resolve_all`](Self::resolve_all), with another resolver.
    pub async fn resolve_all_with(
        &self,
        resolver: &dyn Resolve,
    ) -> Result<Vec<SocketAddr>, AddressError> {
        let input = self.to_string();
        let mut addrs: Vec<SocketAddr> = match self.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.port)],
            Err(_) => resolver
                .lookup(&self.host, self.port)
                .await
                .map_err(|e| AddressError::new(&input, e.to_string()))?,
        };
        // getaddrinfo lists an address once per socket type.
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(*a));
        if addrs.is_empty() {
            return Err(AddressError::new(&input, "the name has no addresses"));
        }
        for addr in &addrs {
            if addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(AddressError::new(
                    &input,
                    format!("{} is not a unicast host address", addr.ip()),
                ));
            }
        }
        Ok(addrs)
    }

    /// A source of `wire` at one address.
    pub fn new(wire: Wire, addr: SocketAddr) -> SourceSpec {
        SourceSpec {
            wire,
            host: addr.ip().to_string(),
            port: addr.port(),
            pool: false,
        }
    }

    /// The first address the host resolves to.
    pub async fn resolve(&self) -> Result<SocketAddr, AddressError> {
        Ok(self.resolve_all().await?[0])
    }
}

/// Parses and resolves `input` to its first address.
pub async fn resolve(input: &str) -> Result<(SourceSpec, SocketAddr), AddressError> {
    let spec: SourceSpec = input.parse()?;
    let addr = spec.resolve().await?;
    Ok((spec, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_the_usual_forms() {
        let v4: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let v6: SocketAddr = "[::1]:8081".parse().unwrap();
        for (input, want) in [
            ("127.0.0.1:8081", v4),
            ("127.0.0.1", v4),
            ("cerv://127.0.0.1", v4),
            ("[::1]:8081", v6),
            ("::1", v6),
            ("[::1]", v6),
            ("CERV://[::1]", v6),
        ] {
            let (spec, addr) = resolve(input).await.unwrap();
            assert_eq!((spec.wire, addr), (Wire::Cerv, want), "{input}");
        }
        assert_eq!(resolve(" 127.0.0.1:9 ").await.unwrap().1.port(), 9);
        assert!(resolve("localhost").await.unwrap().1.ip().is_loopback());
        let (spec, addr) = resolve("ntp://127.0.0.1").await.unwrap();
        assert_eq!((spec.wire, addr.port()), (Wire::Ntp, 123));
        let (spec, addr) = resolve("ntp://[::1]:12300").await.unwrap();
        assert_eq!(
            (spec.wire, addr),
            (Wire::Ntp, "[::1]:12300".parse().unwrap())
        );
        assert_eq!(spec.to_string(), "ntp://[::1]:12300");
        assert_eq!(
            "127.0.0.1".parse::<SourceSpec>().unwrap().to_string(),
            "127.0.0.1:8081"
        );
    }

    #[tokio::test]
    async fn rejects_bad_input_naming_it() {
        for (input, why) in [
            ("127.0.0.1:99999", "invalid port '99999'"),
            ("localhost:http", "invalid port 'http'"),
            ("127.0.0.1:0", "port 0"),
            ("0.0.0.0:8081", "not a unicast"),
            ("", "empty address"),
            ("ntp://", "empty address"),
            ("a b:1", "invalid host name"),
            (":8081", "invalid host name"),
            ("ftp://example.org", "unknown scheme 'ftp://'"),
            ("[::1", "unclosed"),
            ("[::1]x", "invalid port"),
            ("ntp://host/path", "invalid host name"),
        ] {
            let err = resolve(input).await.unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("cannot resolve server address '{input}'"))
                    || err.starts_with("cannot resolve server address '"),
                "{err}"
            );
            assert!(err.contains(why), "{input}: {err}");
        }
    }
}
