//! `host[:port]` to a socket address.

use std::net::{IpAddr, SocketAddr};

/// The port cerv listens on by default.
pub const DEFAULT_PORT: u16 = 8081;

/// A server address that cannot be used; the message names the input.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve server address '{input}': {reason}")]
pub struct AddressError {
    input: String,
    reason: String,
}

fn error(input: &str, reason: impl Into<String>) -> AddressError {
    AddressError {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// Resolves `127.0.0.1:8081`, `[::1]:8081`, `::1`, `localhost` or
/// `host:port`; a missing port means [`DEFAULT_PORT`].
pub async fn resolve(input: &str) -> Result<SocketAddr, AddressError> {
    let input_trimmed = input.trim();
    if input_trimmed.is_empty() {
        return Err(error(input, "empty address"));
    }
    if let Ok(addr) = input_trimmed.parse::<SocketAddr>() {
        return check(input, addr);
    }
    if let Ok(ip) = input_trimmed.trim_matches(['[', ']']).parse::<IpAddr>() {
        return check(input, SocketAddr::new(ip, DEFAULT_PORT));
    }
    let (host, port) = match input_trimmed.rsplit_once(':') {
        Some((host, port)) => {
            let port: u16 = port.parse().map_err(|_| {
                error(
                    input,
                    format!("invalid port '{port}' (expected 1 to 65535)"),
                )
            })?;
            (host, port)
        }
        None => (input_trimmed, DEFAULT_PORT),
    };
    if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
        return Err(error(input, "invalid host name"));
    }
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| error(input, e.to_string()))?;
    match addrs.next() {
        Some(addr) => check(input, addr),
        None => Err(error(input, "the name has no addresses")),
    }
}

fn check(input: &str, addr: SocketAddr) -> Result<SocketAddr, AddressError> {
    if addr.port() == 0 {
        return Err(error(input, "port 0 is not a server port"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(error(
            input,
            format!("{} is not a unicast host address", addr.ip()),
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_the_usual_forms() {
        let v4: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let v6: SocketAddr = "[::1]:8081".parse().unwrap();
        assert_eq!(resolve("127.0.0.1:8081").await.unwrap(), v4);
        assert_eq!(resolve("127.0.0.1").await.unwrap(), v4);
        assert_eq!(resolve("[::1]:8081").await.unwrap(), v6);
        assert_eq!(resolve("::1").await.unwrap(), v6);
        assert_eq!(resolve("[::1]").await.unwrap(), v6);
        assert_eq!(resolve(" 127.0.0.1:9 ").await.unwrap().port(), 9);
        assert!(resolve("localhost").await.unwrap().ip().is_loopback());
    }

    #[tokio::test]
    async fn rejects_bad_input_naming_it() {
        for (input, why) in [
            ("127.0.0.1:99999", "invalid port '99999'"),
            ("localhost:http", "invalid port 'http'"),
            ("127.0.0.1:0", "port 0"),
            ("0.0.0.0:8081", "not a unicast"),
            ("", "empty address"),
            ("a b:1", "invalid host name"),
            (":8081", "invalid host name"),
        ] {
            let err = resolve(input).await.unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("cannot resolve server address '{input}'")),
                "{err}"
            );
            assert!(err.contains(why), "{input}: {err}");
        }
    }
}
