//! NTS Key Establishment (RFC 8915 §4): the records a client and server
//! exchange over TLS 1.3 (ALPN `ntske/1`, port 4460) before any NTP, as
//! pure functions over bytes. The TLS session itself, and the key export
//! from it, belong to the caller; [`export_keys`] says what to export.
//!
//! A message is a sequence of records, each
//!
//! ```text
//! |C|   type (15)   |  body length (16)  |  body ...
//! ```
//!
//! ending with a critical End of Message record of empty body. A record
//! with the critical bit set that the receiver does not understand fails
//! the whole exchange; one without it is ignored.
//!
//! The exchange, as chrony 4.3 runs it (and as this module matches):
//!
//! ```text
//! client: Next Protocol [NTPv4] (C) · AEAD [15] (C) · End (C)
//! server: Next Protocol [NTPv4] (C) · AEAD [15] (C) · [Port (C)] · [Server (C)]
//!         · 8 × New Cookie · End (C)
//!     or: Error [code] (C) · End (C)
//!     or: Next Protocol [] (C) · End (C)                    no common protocol
//!     or: Next Protocol [NTPv4] (C) · AEAD [] (C) · End (C) no common algorithm
//! ```
//!
//! Records may arrive split across TLS reads in any way: [`Decoder`] takes
//! bytes as they come and says when a message is complete, with a size
//! limit so a peer cannot make it buffer without bound.

use super::aead::{Aead, Key};
use super::cookie::{CookieKeys, MasterKeys};
use std::fmt;

/// The NTS-KE TCP port.
pub const PORT: u16 = 4460;
/// The TLS ALPN protocol name both sides must negotiate.
pub const ALPN: &[u8] = b"ntske/1";
/// The TLS exporter label for the NTP keys (RFC 8915 §5.1).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-network-time-security";
/// The Next Protocol id of NTPv4.
pub const NTPV4: u16 = 0;
/// Longest message accepted: chrony's limit (`NKE_MAX_MESSAGE_LENGTH`).
/// A whole response with eight cookies is about 900 bytes.
pub const MAX_MESSAGE_LEN: usize = 16384;
/// Cookies a server sends in one response (RFC 8915 suggests
/// eight, chrony sends eight and keeps at most eight).
pub const COOKIES_PER_RESPONSE: usize = 8;
/// Longest cookie a client keeps: chrony's `NKE_MAX_COOKIE_LENGTH`.
pub const MAX_COOKIE_LEN: usize = 256;
/// Longest NTPv4 server name a client accepts.
pub const MAX_SERVER_NAME_LEN: usize = 255;

/// Record types (the IANA registry RFC 8915 creates), without the
/// critical bit.
pub mod kind {
    /// End of Message: the last record, critical, empty.
    pub const END_OF_MESSAGE: u16 = 0;
    /// NTS Next Protocol Negotiation: a list of protocol ids.
    pub const NEXT_PROTOCOL: u16 = 1;
    /// Error: a 16-bit code; the exchange failed.
    pub const ERROR: u16 = 2;
    /// Warning: a 16-bit code.
    pub const WARNING: u16 = 3;
    /// AEAD Algorithm Negotiation: a list of AEAD ids.
    pub const AEAD_ALGORITHM: u16 = 4;
    /// New Cookie for NTPv4: one opaque cookie.
    pub const NEW_COOKIE: u16 = 5;
    /// NTPv4 Server Negotiation: an ASCII host name or address.
    pub const NTPV4_SERVER: u16 = 6;
    /// NTPv4 Port Negotiation: a 16-bit port.
    pub const NTPV4_PORT: u16 = 7;
}

const CRITICAL_BIT: u16 = 0x8000;

/// Which way keys protect traffic; the last byte of the exporter context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Requests, client to server (0x00).
    ClientToServer,
    /// Replies, server to client (0x01).
    ServerToClient,
}

/// The exporter context for one direction's key (RFC 8915 §5.1): the
/// Next Protocol id (NTPv4, 0), the AEAD id, then 0x00 for client to
/// server or 0x01 for server to client. For AEAD 15: `00 00 00 0f 00` and
/// `00 00 00 0f 01`, byte for byte chrony's `NKE_EXPORTER_CONTEXT_C2S/S2C`.
pub fn exporter_context(aead: Aead, direction: Direction) -> [u8; 5] {
    let [p0, p1] = NTPV4.to_be_bytes();
    let [a0, a1] = aead.id().to_be_bytes();
    let d = match direction {
        Direction::ClientToServer => 0,
        Direction::ServerToClient => 1,
    };
    [p0, p1, a0, a1, d]
}

/// Both directions' keys for `aead`, from a TLS exporter (RFC 5705):
/// `export(out, label, context)` fills `out` with keying material. With
/// rustls: `|out, label, ctx| conn.export_keying_material(out, label,
/// Some(ctx)).map(|_| ())`. The same call on both ends yields the same
/// keys.
pub fn export_keys<E>(
    aead: Aead,
    mut export: impl FnMut(&mut [u8], &[u8], &[u8]) -> Result<(), E>,
) -> Result<CookieKeys, E> {
    let mut c2s = [0u8; super::aead::KEY_LEN];
    let mut s2c = [0u8; super::aead::KEY_LEN];
    let len = aead.key_len();
    export(
        &mut c2s[..len],
        EXPORTER_LABEL,
        &exporter_context(aead, Direction::ClientToServer),
    )?;
    export(
        &mut s2c[..len],
        EXPORTER_LABEL,
        &exporter_context(aead, Direction::ServerToClient),
    )?;
    Ok(CookieKeys {
        aead,
        c2s: Key::from_bytes(c2s),
        s2c: Key::from_bytes(s2c),
    })
}

/// An NTS-KE error code (RFC 8915 §4.1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// A critical record the server does not understand.
    pub const UNRECOGNIZED_CRITICAL_RECORD: ErrorCode = ErrorCode(0);
    /// A malformed request.
    pub const BAD_REQUEST: ErrorCode = ErrorCode(1);
    /// The server could not complete the exchange.
    pub const INTERNAL_SERVER_ERROR: ErrorCode = ErrorCode(2);
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            ErrorCode::UNRECOGNIZED_CRITICAL_RECORD => "unrecognized critical record",
            ErrorCode::BAD_REQUEST => "bad request",
            ErrorCode::INTERNAL_SERVER_ERROR => "internal server error",
            _ => "unknown error",
        };
        write!(f, "{name} ({})", self.0)
    }
}

/// Why an NTS-KE message was refused, or could not be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeError {
    /// The message grew past the limit before it ended.
    #[error("message longer than {limit} bytes")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// The input ended inside a message.
    #[error("message ends before its end-of-message record")]
    Truncated,
    /// An End of Message record without the critical bit, or with a body.
    #[error("malformed end-of-message record")]
    BadEndOfMessage,
    /// Bytes after the End of Message record.
    #[error("data after the end-of-message record")]
    TrailingData,
    /// A record body of more than 65535 bytes, or a type above 0x7fff.
    #[error("record of type {kind} with {len} bytes of body cannot be encoded")]
    Unencodable {
        /// The record type.
        kind: u16,
        /// Its body's length.
        len: usize,
    },
    /// The server answered with an Error record.
    #[error("the server sent error: {0}")]
    ServerError(ErrorCode),
    /// The server answered with a Warning record (none is defined; like
    /// chrony, a warning ends the exchange).
    #[error("the server sent warning {0}")]
    ServerWarning(u16),
    /// A critical record of a type this side does not understand.
    #[error("unrecognized critical record of type {0}")]
    UnrecognizedCritical(u16),
    /// The server speaks none of the protocols offered (only NTPv4 is).
    #[error("the server supports no protocol we offered (NTPv4)")]
    NoCommonProtocol,
    /// The server supports none of the AEAD algorithms offered.
    #[error("the server supports no AEAD algorithm we offered")]
    NoCommonAead,
    /// The server chose an algorithm that was not offered.
    #[error("the server chose AEAD algorithm {0}, which we did not offer")]
    UnexpectedAead(u16),
    /// A record that may appear once appeared again.
    #[error("record of type {0} appears twice")]
    Duplicate(u16),
    /// A record whose body is not what its type requires.
    #[error("malformed record of type {kind}: {reason}")]
    BadRecord {
        /// The record type.
        kind: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// A record the message must carry is missing.
    #[error("no {0} record")]
    Missing(&'static str),
    /// A successful response without a single usable cookie.
    #[error("the server sent no usable cookie")]
    NoCookies,
    /// An NTPv4 server name that is empty, too long or not printable ASCII.
    #[error("invalid NTPv4 server name")]
    InvalidServerName,
}

/// One record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The critical bit.
    pub critical: bool,
    /// The type, 0 to 0x7fff (see [`kind`]).
    pub kind: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Record {
    /// A record.
    pub fn new(critical: bool, kind: u16, body: Vec<u8>) -> Record {
        Record {
            critical,
            kind,
            body,
        }
    }

    /// A record whose body is a list of 16-bit values.
    pub fn list(critical: bool, kind: u16, values: &[u16]) -> Record {
        let body = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        Record::new(critical, kind, body)
    }

    /// Appends the record's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), KeError> {
        let len = u16::try_from(self.body.len())
            .ok()
            .filter(|_| self.kind & CRITICAL_BIT == 0)
            .ok_or(KeError::Unencodable {
                kind: self.kind,
                len: self.body.len(),
            })?;
        let kind = self.kind | if self.critical { CRITICAL_BIT } else { 0 };
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.body);
        Ok(())
    }

    /// The body as a list of 16-bit values, if its length is even.
    fn u16s(&self) -> Option<Vec<u16>> {
        if !self.body.len().is_multiple_of(2) {
            return None;
        }
        Some(
            self.body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        )
    }

    /// The body as one 16-bit value, if it is exactly two bytes.
    fn single_u16(&self) -> Option<u16> {
        match self.body[..] {
            [a, b] => Some(u16::from_be_bytes([a, b])),
            _ => None,
        }
    }
}

/// A complete message: its records in order, without the End of Message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The records.
    pub records: Vec<Record>,
}

impl Message {
    /// The message's encoding, End of Message included.
    pub fn encode(&self) -> Result<Vec<u8>, KeError> {
        let mut out = Vec::new();
        for record in &self.records {
            record.encode(&mut out)?;
        }
        Record::new(true, kind::END_OF_MESSAGE, Vec::new()).encode(&mut out)?;
        Ok(out)
    }

    /// Decodes one whole message from `bytes`, which must hold exactly
    /// one.
    pub fn decode(bytes: &[u8]) -> Result<Message, KeError> {
        match Decoder::new().feed(bytes)? {
            Decoded::Complete(message) => Ok(message),
            Decoded::NeedMore => Err(KeError::Truncated),
        }
    }
}

/// What [`Decoder::feed`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The message has not ended yet: read more.
    NeedMore,
    /// The message ended with the bytes just fed.
    Complete(Message),
}

/// An incremental message decoder: feed it bytes as they arrive.
#[derive(Clone, Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already split into records.
    parsed: usize,
    records: Vec<Record>,
    limit: usize,
    done: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder for messages of at most [`MAX_MESSAGE_LEN`] bytes.
    pub fn new() -> Decoder {
        Decoder::with_limit(MAX_MESSAGE_LEN)
    }

    /// A decoder for messages of at most `limit` bytes.
    pub fn with_limit(limit: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            parsed: 0,
            records: Vec::new(),
            limit,
            done: false,
        }
    }

    /// Takes the next bytes of the stream. Once a message is complete,
    /// the decoder is spent: more bytes are [`KeError::TrailingData`]
    /// (neither side sends anything after End of Message).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Decoded, KeError> {
        if self.done {
            return Err(KeError::TrailingData);
        }
        if self.buf.len() + bytes.len() > self.limit {
            return Err(KeError::TooLong { limit: self.limit });
        }
        self.buf.extend_from_slice(bytes);
        loop {
            let rest = &self.buf[self.parsed..];
            let [t0, t1, l0, l1, ..] = *rest else {
                return Ok(Decoded::NeedMore);
            };
            let kind_bits = u16::from_be_bytes([t0, t1]);
            let len = usize::from(u16::from_be_bytes([l0, l1]));
            let end = self.parsed + 4 + len;
            if end > self.limit {
                // Fail now, not after buffering up to the limit.
                return Err(KeError::TooLong { limit: self.limit });
            }
            let Some(body) = self.buf.get(self.parsed + 4..end) else {
                return Ok(Decoded::NeedMore);
            };
            let critical = kind_bits & CRITICAL_BIT != 0;
            let kind = kind_bits & !CRITICAL_BIT;
            if kind == kind::END_OF_MESSAGE {
                if !critical || len != 0 {
                    return Err(KeError::BadEndOfMessage);
                }
                if end != self.buf.len() {
                    return Err(KeError::TrailingData);
                }
                self.done = true;
                self.buf = Vec::new();
                return Ok(Decoded::Complete(Message {
                    records: std::mem::take(&mut self.records),
                }));
            }
            self.records
                .push(Record::new(critical, kind, body.to_vec()));
            self.parsed = end;
        }
    }
}

// ---------------------------------------------------------------- client

/// The client's request: NTPv4, and the AEAD algorithms in `aeads` in
/// order of preference (both records critical, as chrony sends them).
pub fn write_request(aeads: &[Aead]) -> Vec<u8> {
    let ids: Vec<u16> = aeads.iter().map(|a| a.id()).collect();
    let mut out = Vec::with_capacity(16);
    let _ = Record::list(true, kind::NEXT_PROTOCOL, &[NTPV4]).encode(&mut out);
    let _ = Record::list(true, kind::AEAD_ALGORITHM, &ids).encode(&mut out);
    let _ = Record::new(true, kind::END_OF_MESSAGE, Vec::new()).encode(&mut out);
    out
}

/// What a successful NTS-KE exchange gives a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeResponse {
    /// The algorithm chosen; export the keys for it with [`export_keys`].
    pub aead: Aead,
    /// Cookies for NTS requests, in the order received (at most
    /// [`COOKIES_PER_RESPONSE`]).
    pub cookies: Vec<Vec<u8>>,
    /// The NTP server to ask, if not the NTS-KE server's own address.
    pub server: Option<String>,
    /// The NTP port to ask, if not 123.
    pub port: Option<u16>,
}

/// Reads the server's response to a request that offered `offered`.
/// Cookies of unusable length (empty, longer than [`MAX_COOKIE_LEN`], or
/// not a multiple of 4) are skipped as chrony skips them; the response
/// fails only if none is left.
pub fn parse_response(response: &Message, offered: &[Aead]) -> Result<KeResponse, KeError> {
    let mut protocol = false;
    let mut aead = None;
    let mut cookies = Vec::new();
    let mut server = None;
    let mut port = None;
    for r in &response.records {
        let bad = |reason| KeError::BadRecord {
            kind: r.kind,
            reason,
        };
        match r.kind {
            kind::ERROR => {
                let code = r.single_u16().ok_or(bad("body is not 2 bytes"))?;
                return Err(KeError::ServerError(ErrorCode(code)));
            }
            kind::WARNING => {
                let code = r.single_u16().ok_or(bad("body is not 2 bytes"))?;
                return Err(KeError::ServerWarning(code));
            }
            kind::NEXT_PROTOCOL => {
                if protocol {
                    return Err(KeError::Duplicate(r.kind));
                }
                if !r.critical {
                    return Err(bad("not critical"));
                }
                match r.u16s().as_deref() {
                    Some([]) => return Err(KeError::NoCommonProtocol),
                    Some([NTPV4]) => protocol = true,
                    _ => return Err(bad("not the one protocol offered (NTPv4)")),
                }
            }
            kind::AEAD_ALGORITHM => {
                if aead.is_some() {
                    return Err(KeError::Duplicate(r.kind));
                }
                match r.u16s().as_deref() {
                    Some([]) => return Err(KeError::NoCommonAead),
                    Some(&[id]) => {
                        let chosen = Aead::from_id(id)
                            .filter(|a| offered.contains(a))
                            .ok_or(KeError::UnexpectedAead(id))?;
                        aead = Some(chosen);
                    }
                    _ => return Err(bad("not exactly one algorithm")),
                }
            }
            kind::NEW_COOKIE => {
                let usable =
                    (4..=MAX_COOKIE_LEN).contains(&r.body.len()) && r.body.len().is_multiple_of(4);
                if usable && cookies.len() < COOKIES_PER_RESPONSE {
                    cookies.push(r.body.clone());
                }
            }
            kind::NTPV4_SERVER => {
                if server.is_some() {
                    return Err(KeError::Duplicate(r.kind));
                }
                if !valid_server_name(&r.body) {
                    return Err(KeError::InvalidServerName);
                }
                server = Some(r.body.iter().map(|&b| b as char).collect());
            }
            kind::NTPV4_PORT => {
                if port.is_some() {
                    return Err(KeError::Duplicate(r.kind));
                }
                let p = r.single_u16().ok_or(bad("body is not 2 bytes"))?;
                if p == 0 {
                    return Err(bad("port 0"));
                }
                port = Some(p);
            }
            kind::END_OF_MESSAGE => return Err(KeError::TrailingData),
            other if r.critical => return Err(KeError::UnrecognizedCritical(other)),
            _ => {}
        }
    }
    if !protocol {
        return Err(KeError::Missing("next protocol"));
    }
    let aead = aead.ok_or(KeError::Missing("AEAD algorithm"))?;
    if cookies.is_empty() {
        return Err(KeError::NoCookies);
    }
    Ok(KeResponse {
        aead,
        cookies,
        server,
        port,
    })
}

/// A host name or address as NTS-KE carries it: 1 to 255 printable ASCII
/// characters, no spaces (chrony requires the same).
fn valid_server_name(name: &[u8]) -> bool {
    (1..=MAX_SERVER_NAME_LEN).contains(&name.len()) && name.iter().all(u8::is_ascii_graphic)
}

// ---------------------------------------------------------------- server

/// What a well-formed request asks for, as this server can answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// NTPv4 with this algorithm (the first offered that is supported).
    Ntpv4(Aead),
    /// The client does not offer NTPv4.
    NoCommonProtocol,
    /// NTPv4, but no algorithm offered is supported.
    NoCommonAead,
}

/// Reads a client's request. A malformed one gives the error code to send
/// back: [`ErrorCode::UNRECOGNIZED_CRITICAL_RECORD`] for a critical record
/// of unknown type, [`ErrorCode::BAD_REQUEST`] for the rest (a missing,
/// repeated or non-critical Next Protocol record, a missing or repeated
/// AEAD record, an empty or odd-length list, or an Error, Warning or New
/// Cookie record, which only servers send), judged in record order as
/// chrony does. Server and port records a client may send as hints are
/// read and ignored.
pub fn negotiate(request: &Message) -> Result<Negotiated, ErrorCode> {
    let mut protocols: Option<Vec<u16>> = None;
    let mut aeads: Option<Vec<u16>> = None;
    for r in &request.records {
        match r.kind {
            kind::NEXT_PROTOCOL => {
                let list = r.u16s().filter(|l| !l.is_empty() && r.critical);
                if protocols.is_some() || list.is_none() {
                    return Err(ErrorCode::BAD_REQUEST);
                }
                protocols = list;
            }
            kind::AEAD_ALGORITHM => {
                let list = r.u16s().filter(|l| !l.is_empty());
                if aeads.is_some() || list.is_none() {
                    return Err(ErrorCode::BAD_REQUEST);
                }
                aeads = list;
            }
            kind::ERROR | kind::WARNING | kind::NEW_COOKIE | kind::END_OF_MESSAGE => {
                return Err(ErrorCode::BAD_REQUEST);
            }
            kind::NTPV4_PORT if r.single_u16().is_none() => return Err(ErrorCode::BAD_REQUEST),
            kind::NTPV4_SERVER | kind::NTPV4_PORT => {}
            _ if r.critical => return Err(ErrorCode::UNRECOGNIZED_CRITICAL_RECORD),
            _ => {}
        }
    }
    let protocols = protocols.ok_or(ErrorCode::BAD_REQUEST)?;
    if !protocols.contains(&NTPV4) {
        return Ok(Negotiated::NoCommonProtocol);
    }
    let aeads = aeads.ok_or(ErrorCode::BAD_REQUEST)?;
    Ok(aeads
        .iter()
        .find_map(|&id| Aead::from_id(id))
        .map_or(Negotiated::NoCommonAead, Negotiated::Ntpv4))
}

/// Where a server tells clients to send NTP, when not to itself on 123.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// An NTPv4 Server Negotiation record: a host name or address.
    pub server: Option<String>,
    /// An NTPv4 Port Negotiation record.
    pub port: Option<u16>,
}

/// The server's response. For [`Negotiated::Ntpv4`] that is the
/// protocol, the algorithm, the port and server if set, then `cookies`
/// (which must not be empty), in chrony's order and with its critical
/// bits; otherwise the refusal, with empty lists (RFC 8915 §4.1.2, §4.1.5).
pub fn write_response(
    negotiated: Negotiated,
    cookies: &[Vec<u8>],
    options: &ServerOptions,
) -> Result<Vec<u8>, KeError> {
    let mut records = Vec::new();
    match negotiated {
        Negotiated::NoCommonProtocol => {
            records.push(Record::list(true, kind::NEXT_PROTOCOL, &[]));
        }
        Negotiated::NoCommonAead => {
            records.push(Record::list(true, kind::NEXT_PROTOCOL, &[NTPV4]));
            records.push(Record::list(true, kind::AEAD_ALGORITHM, &[]));
        }
        Negotiated::Ntpv4(aead) => {
            if cookies.is_empty() {
                return Err(KeError::NoCookies);
            }
            records.push(Record::list(true, kind::NEXT_PROTOCOL, &[NTPV4]));
            records.push(Record::list(true, kind::AEAD_ALGORITHM, &[aead.id()]));
            if let Some(port) = options.port {
                records.push(Record::list(true, kind::NTPV4_PORT, &[port]));
            }
            if let Some(server) = &options.server {
                if !valid_server_name(server.as_bytes()) {
                    return Err(KeError::InvalidServerName);
                }
                records.push(Record::new(
                    true,
                    kind::NTPV4_SERVER,
                    server.as_bytes().to_vec(),
                ));
            }
            for cookie in cookies {
                records.push(Record::new(false, kind::NEW_COOKIE, cookie.clone()));
            }
        }
    }
    Message { records }.encode()
}

/// An Error response: the code, then End of Message.
pub fn write_error(code: ErrorCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    let _ = Record::list(true, kind::ERROR, &[code.0]).encode(&mut out);
    let _ = Record::new(true, kind::END_OF_MESSAGE, Vec::new()).encode(&mut out);
    out
}

/// The whole server side of one exchange: the response to `request`,
/// with [`COOKIES_PER_RESPONSE`] fresh cookies sealed under `master` when
/// NTPv4 is agreed. `export` gives the session's keys for the chosen
/// algorithm (see [`export_keys`]); if it cannot, the client gets an
/// internal server error.
pub fn respond(
    request: &Message,
    export: impl FnOnce(Aead) -> Option<CookieKeys>,
    master: &MasterKeys,
    options: &ServerOptions,
) -> Vec<u8> {
    let negotiated = match negotiate(request) {
        Ok(n) => n,
        Err(code) => return write_error(code),
    };
    let cookies = match negotiated {
        Negotiated::Ntpv4(aead) => match export(aead) {
            Some(keys) => (0..COOKIES_PER_RESPONSE)
                .map(|_| master.seal(&keys, &rand::random()))
                .collect(),
            None => return write_error(ErrorCode::INTERNAL_SERVER_ERROR),
        },
        _ => Vec::new(),
    };
    write_response(negotiated, &cookies, options)
        .unwrap_or_else(|_| write_error(ErrorCode::INTERNAL_SERVER_ERROR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nts::cookie::COOKIE_LEN;
    use proptest::prelude::*;

    const SIV: Aead = Aead::AesSivCmac256;

    fn keys() -> CookieKeys {
        CookieKeys {
            aead: SIV,
            c2s: Key::from_bytes([1; 32]),
            s2c: Key::from_bytes([2; 32]),
        }
    }

    fn master() -> MasterKeys {
        MasterKeys::new(7, Key::from_bytes([0x55; 32]))
    }

    fn msg(records: Vec<Record>) -> Message {
        Message { records }
    }

    fn crit(kind: u16, values: &[u16]) -> Record {
        Record::list(true, kind, values)
    }

    #[test]
    fn the_request_is_byte_for_byte_chronys() {
        // chrony 4.3 prepare_request(): next protocol [0] and AEAD [15],
        // both critical, then End of Message.
        assert_eq!(
            write_request(&[SIV]),
            [
                0x80, 1, 0, 2, 0, 0, // next protocol: NTPv4
                0x80, 4, 0, 2, 0, 15, // AEAD: AES-SIV-CMAC-256
                0x80, 0, 0, 0, // end of message
            ]
        );
    }

    #[test]
    fn exporter_contexts_are_chronys() {
        assert_eq!(EXPORTER_LABEL, b"EXPORTER-network-time-security");
        assert_eq!(
            exporter_context(SIV, Direction::ClientToServer),
            *b"\x00\x00\x00\x0f\x00"
        );
        assert_eq!(
            exporter_context(SIV, Direction::ServerToClient),
            *b"\x00\x00\x00\x0f\x01"
        );
    }

    #[test]
    fn keys_are_exported_per_direction() {
        let mut calls = Vec::new();
        let got = export_keys(SIV, |out: &mut [u8], label: &[u8], ctx: &[u8]| {
            calls.push((out.len(), label.to_vec(), ctx.to_vec()));
            out.fill(ctx[4] + 1);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(got, keys());
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0],
            (32, EXPORTER_LABEL.to_vec(), vec![0, 0, 0, 15, 0])
        );
        assert_eq!(calls[1].2, vec![0, 0, 0, 15, 1]);
        assert_eq!(export_keys(SIV, |_, _, _| Err("no tls")), Err("no tls"));
    }

    #[test]
    fn a_whole_exchange_round_trips() {
        let request = Message::decode(&write_request(&Aead::ALL)).unwrap();
        assert_eq!(negotiate(&request), Ok(Negotiated::Ntpv4(SIV)));
        let options = ServerOptions {
            server: Some("ntp.example.org".into()),
            port: Some(1123),
        };
        let response = respond(&request, |_| Some(keys()), &master(), &options);
        let parsed = parse_response(&Message::decode(&response).unwrap(), &[SIV]).unwrap();
        assert_eq!(parsed.aead, SIV);
        assert_eq!(parsed.server.as_deref(), Some("ntp.example.org"));
        assert_eq!(parsed.port, Some(1123));
        assert_eq!(parsed.cookies.len(), COOKIES_PER_RESPONSE);
        for cookie in &parsed.cookies {
            assert_eq!(cookie.len(), COOKIE_LEN);
            assert_eq!(master().open(cookie), Ok(keys()));
        }
        // Every cookie is different: they must not link requests.
        let mut distinct = parsed.cookies.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), COOKIES_PER_RESPONSE);
    }

    #[test]
    fn the_response_is_in_chronys_order_with_its_critical_bits() {
        let cookies = vec![vec![0xc0; 8], vec![0xc1; 8]];
        let options = ServerOptions {
            server: Some("a.b".into()),
            port: Some(4123),
        };
        let bytes = write_response(Negotiated::Ntpv4(SIV), &cookies, &options).unwrap();
        let m = Message::decode(&bytes).unwrap();
        let shape: Vec<(bool, u16)> = m.records.iter().map(|r| (r.critical, r.kind)).collect();
        assert_eq!(
            shape,
            [
                (true, kind::NEXT_PROTOCOL),
                (true, kind::AEAD_ALGORITHM),
                (true, kind::NTPV4_PORT),
                (true, kind::NTPV4_SERVER),
                (false, kind::NEW_COOKIE),
                (false, kind::NEW_COOKIE),
            ]
        );
        assert_eq!(bytes[bytes.len() - 4..], [0x80, 0, 0, 0]);
        // Without options: no port or server records at all.
        let plain = write_response(Negotiated::Ntpv4(SIV), &cookies, &ServerOptions::default());
        assert_eq!(Message::decode(&plain.unwrap()).unwrap().records.len(), 4);
        assert_eq!(
            write_response(Negotiated::Ntpv4(SIV), &[], &options),
            Err(KeError::NoCookies)
        );
        let spaced = ServerOptions {
            server: Some("a b".into()),
            port: None,
        };
        assert_eq!(
            write_response(Negotiated::Ntpv4(SIV), &cookies, &spaced),
            Err(KeError::InvalidServerName)
        );
    }

    #[test]
    fn refusals_say_what_is_missing() {
        let no_ntp = msg(vec![
            crit(kind::NEXT_PROTOCOL, &[0x8000]),
            crit(kind::AEAD_ALGORITHM, &[15]),
        ]);
        assert_eq!(negotiate(&no_ntp), Ok(Negotiated::NoCommonProtocol));
        let resp = respond(
            &no_ntp,
            |_| unreachable!(),
            &master(),
            &ServerOptions::default(),
        );
        assert_eq!(resp, [0x80, 1, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(
            parse_response(&Message::decode(&resp).unwrap(), &[SIV]),
            Err(KeError::NoCommonProtocol)
        );

        // chrony 4.4+ offers AES-128-GCM-SIV (30) first; without 15 there
        // is nothing in common.
        let gcm_only = msg(vec![
            crit(kind::NEXT_PROTOCOL, &[0]),
            crit(kind::AEAD_ALGORITHM, &[30]),
        ]);
        assert_eq!(negotiate(&gcm_only), Ok(Negotiated::NoCommonAead));
        let resp = respond(
            &gcm_only,
            |_| unreachable!(),
            &master(),
            &ServerOptions::default(),
        );
        assert_eq!(resp, [0x80, 1, 0, 2, 0, 0, 0x80, 4, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(
            parse_response(&Message::decode(&resp).unwrap(), &[SIV]),
            Err(KeError::NoCommonAead)
        );
        // With 15 later in the list, 15 is chosen.
        let both = msg(vec![
            crit(kind::NEXT_PROTOCOL, &[0]),
            crit(kind::AEAD_ALGORITHM, &[30, 15]),
        ]);
        assert_eq!(negotiate(&both), Ok(Negotiated::Ntpv4(SIV)));
    }

    #[test]
    fn bad_requests_get_the_right_error_code() {
        let np = || crit(kind::NEXT_PROTOCOL, &[0]);
        let aead = || crit(kind::AEAD_ALGORITHM, &[15]);
        let bad = ErrorCode::BAD_REQUEST;
        let cases: Vec<(&str, Vec<Record>, ErrorCode)> = vec![
            ("empty", vec![], bad),
            ("no next protocol", vec![aead()], bad),
            ("no aead", vec![np()], bad),
            (
                "next protocol not critical",
                vec![Record::list(false, 1, &[0]), aead()],
                bad,
            ),
            ("empty protocol list", vec![crit(1, &[]), aead()], bad),
            (
                "odd protocol list",
                vec![Record::new(true, 1, vec![0, 0, 0]), aead()],
                bad,
            ),
            ("two next protocols", vec![np(), np(), aead()], bad),
            ("two aeads", vec![np(), aead(), aead()], bad),
            ("empty aead list", vec![np(), crit(4, &[])], bad),
            (
                "error record",
                vec![np(), aead(), crit(kind::ERROR, &[1])],
                bad,
            ),
            (
                "warning record",
                vec![np(), aead(), crit(kind::WARNING, &[1])],
                bad,
            ),
            (
                "cookie record",
                vec![np(), aead(), Record::new(false, 5, vec![1; 8])],
                bad,
            ),
            (
                "bad port",
                vec![np(), aead(), Record::new(true, 7, vec![1])],
                bad,
            ),
            (
                "unknown critical",
                vec![np(), aead(), crit(0x1234, &[])],
                ErrorCode::UNRECOGNIZED_CRITICAL_RECORD,
            ),
            (
                "first problem wins",
                vec![crit(0x1234, &[]), np(), np()],
                ErrorCode::UNRECOGNIZED_CRITICAL_RECORD,
            ),
        ];
        for (name, records, code) in cases {
            let m = msg(records);
            assert_eq!(negotiate(&m), Err(code), "{name}");
            let resp = respond(&m, |_| Some(keys()), &master(), &ServerOptions::default());
            assert_eq!(resp, write_error(code), "{name}");
            assert_eq!(
                parse_response(&Message::decode(&resp).unwrap(), &[SIV]),
                Err(KeError::ServerError(code)),
                "{name}"
            );
        }
        // Hints, unknown non-critical records (chrony 4.8's "compliant
        // GCM-SIV export", 1024) and a non-critical AEAD record are fine.
        let lenient = msg(vec![
            np(),
            Record::list(false, 4, &[15]),
            Record::new(true, 6, b"x.org".to_vec()),
            crit(7, &[123]),
            Record::new(false, 1024, vec![]),
        ]);
        assert_eq!(negotiate(&lenient), Ok(Negotiated::Ntpv4(SIV)));
        // An export that fails is the server's fault.
        let ok = msg(vec![np(), aead()]);
        assert_eq!(
            respond(&ok, |_| None, &master(), &ServerOptions::default()),
            write_error(ErrorCode::INTERNAL_SERVER_ERROR)
        );
    }

    fn response(records: Vec<Record>) -> Message {
        msg(records)
    }

    #[test]
    fn bad_responses_are_typed() {
        let np = || crit(kind::NEXT_PROTOCOL, &[0]);
        let aead = || crit(kind::AEAD_ALGORITHM, &[15]);
        let cookie = || Record::new(false, kind::NEW_COOKIE, vec![9; 100]);
        let cases: Vec<(&str, Vec<Record>, KeError)> = vec![
            (
                "error 2",
                vec![crit(2, &[2])],
                KeError::ServerError(ErrorCode(2)),
            ),
            (
                "odd error",
                vec![Record::new(true, 2, vec![1])],
                KeError::BadRecord {
                    kind: 2,
                    reason: "body is not 2 bytes",
                },
            ),
            (
                "warning",
                vec![np(), aead(), cookie(), crit(3, &[7])],
                KeError::ServerWarning(7),
            ),
            (
                "no protocol",
                vec![aead(), cookie()],
                KeError::Missing("next protocol"),
            ),
            (
                "no aead",
                vec![np(), cookie()],
                KeError::Missing("AEAD algorithm"),
            ),
            ("no cookie", vec![np(), aead()], KeError::NoCookies),
            (
                "only unusable cookies",
                vec![
                    np(),
                    aead(),
                    Record::new(false, 5, vec![]),
                    Record::new(false, 5, vec![1; 6]),
                    Record::new(false, 5, vec![1; 260]),
                ],
                KeError::NoCookies,
            ),
            (
                "aead not offered",
                vec![np(), crit(4, &[30]), cookie()],
                KeError::UnexpectedAead(30),
            ),
            (
                "two aeads chosen",
                vec![np(), crit(4, &[15, 15]), cookie()],
                KeError::BadRecord {
                    kind: 4,
                    reason: "not exactly one algorithm",
                },
            ),
            (
                "aead twice",
                vec![np(), aead(), aead(), cookie()],
                KeError::Duplicate(4),
            ),
            (
                "protocol twice",
                vec![np(), np(), aead(), cookie()],
                KeError::Duplicate(1),
            ),
            (
                "protocol not critical",
                vec![Record::list(false, 1, &[0]), aead(), cookie()],
                KeError::BadRecord {
                    kind: 1,
                    reason: "not critical",
                },
            ),
            (
                "other protocol",
                vec![crit(1, &[1]), aead(), cookie()],
                KeError::BadRecord {
                    kind: 1,
                    reason: "not the one protocol offered (NTPv4)",
                },
            ),
            (
                "unknown critical",
                vec![np(), aead(), cookie(), crit(99, &[])],
                KeError::UnrecognizedCritical(99),
            ),
            (
                "empty server",
                vec![np(), aead(), cookie(), Record::new(true, 6, vec![])],
                KeError::InvalidServerName,
            ),
            (
                "server with a space",
                vec![
                    np(),
                    aead(),
                    cookie(),
                    Record::new(true, 6, b"a b".to_vec()),
                ],
                KeError::InvalidServerName,
            ),
            (
                "non-ascii server",
                vec![
                    np(),
                    aead(),
                    cookie(),
                    Record::new(true, 6, vec![0xc3, 0xa9]),
                ],
                KeError::InvalidServerName,
            ),
            (
                "port 0",
                vec![np(), aead(), cookie(), crit(7, &[0])],
                KeError::BadRecord {
                    kind: 7,
                    reason: "port 0",
                },
            ),
            (
                "long port",
                vec![np(), aead(), cookie(), crit(7, &[1, 2])],
                KeError::BadRecord {
                    kind: 7,
                    reason: "body is not 2 bytes",
                },
            ),
        ];
        for (name, records, want) in cases {
            assert_eq!(
                parse_response(&response(records), &[SIV]),
                Err(want),
                "{name}"
            );
        }
        // Unknown non-critical records are ignored; extra cookies dropped.
        let mut records = vec![np(), aead(), Record::new(false, 0x4000, vec![1, 2, 3])];
        records.extend((0..10).map(|_| cookie()));
        let ok = parse_response(&response(records), &[SIV]).unwrap();
        assert_eq!(ok.cookies.len(), COOKIES_PER_RESPONSE);
        assert_eq!((ok.server, ok.port), (None, None));
    }

    #[test]
    fn the_decoder_waits_for_the_end_and_enforces_its_limit() {
        let bytes = write_request(&[SIV]);
        // Split at every point: NeedMore until the last byte.
        for split in 0..bytes.len() {
            let mut d = Decoder::new();
            assert_eq!(d.feed(&bytes[..split]), Ok(Decoded::NeedMore), "{split}");
            let Ok(Decoded::Complete(m)) = d.feed(&bytes[split..]) else {
                panic!("split at {split}");
            };
            assert_eq!(m.records.len(), 2);
            assert_eq!(d.feed(&[0]), Err(KeError::TrailingData));
        }
        // One byte at a time.
        let mut d = Decoder::new();
        let results: Vec<_> = bytes.iter().map(|b| d.feed(&[*b])).collect();
        assert!(
            results[..bytes.len() - 1]
                .iter()
                .all(|r| *r == Ok(Decoded::NeedMore))
        );
        assert!(matches!(results.last(), Some(Ok(Decoded::Complete(_)))));

        assert_eq!(
            Message::decode(&bytes[..bytes.len() - 1]),
            Err(KeError::Truncated)
        );
        assert_eq!(
            Message::decode(&[bytes.as_slice(), &[0]].concat()),
            Err(KeError::TrailingData)
        );
        assert_eq!(
            Message::decode(&[0, 0, 0, 0]),
            Err(KeError::BadEndOfMessage)
        );
        assert_eq!(
            Message::decode(&[0x80, 0, 0, 1, 0]),
            Err(KeError::BadEndOfMessage)
        );
        assert_eq!(Message::decode(&[0x80, 0, 0, 0]), Ok(Message::default()));

        // A record announcing more than the limit fails at once.
        let mut d = Decoder::with_limit(100);
        assert_eq!(d.feed(&[0, 5, 0, 97]), Err(KeError::TooLong { limit: 100 }));
        let mut d = Decoder::with_limit(100);
        assert_eq!(d.feed(&[0, 5, 0, 96]), Ok(Decoded::NeedMore));
        assert_eq!(d.feed(&[0; 97]), Err(KeError::TooLong { limit: 100 }));
        // Exactly at the limit is fine.
        let mut d = Decoder::with_limit(12);
        let mut exact = vec![0, 5, 0, 4, 1, 2, 3, 4];
        exact.extend_from_slice(&[0x80, 0, 0, 0]);
        assert!(matches!(d.feed(&exact), Ok(Decoded::Complete(_))));
    }

    #[test]
    fn records_encode_and_refuse_what_cannot_be_encoded() {
        let mut out = Vec::new();
        Record::new(true, 0x7fff, vec![1, 2])
            .encode(&mut out)
            .unwrap();
        assert_eq!(out, [0xff, 0xff, 0, 2, 1, 2]);
        assert_eq!(
            Record::new(false, 0x8000, vec![]).encode(&mut out),
            Err(KeError::Unencodable {
                kind: 0x8000,
                len: 0
            })
        );
        assert_eq!(
            Record::new(false, 5, vec![0; 65536]).encode(&mut out),
            Err(KeError::Unencodable {
                kind: 5,
                len: 65536
            })
        );
        assert_eq!(ErrorCode::BAD_REQUEST.to_string(), "bad request (1)");
        assert_eq!(ErrorCode(77).to_string(), "unknown error (77)");
    }

    fn any_record() -> impl Strategy<Value = Record> {
        (
            any::<bool>(),
            1u16..0x8000,
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(c, k, b)| Record::new(c, k, b))
    }

    proptest! {
        #[test]
        fn messages_round_trip_through_any_split(
            records in prop::collection::vec(any_record(), 0..12),
            splits in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let m = Message { records };
            let bytes = m.encode().unwrap();
            let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort();
            cuts.dedup();
            let mut d = Decoder::new();
            let mut got = None;
            for w in cuts.windows(2) {
                if let Decoded::Complete(done) = d.feed(&bytes[w[0]..w[1]]).unwrap() {
                    prop_assert!(got.is_none());
                    got = Some(done);
                }
            }
            prop_assert_eq!(got, Some(m));
        }

        #[test]
        fn no_bytes_panic_the_decoder_or_either_side(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
        ) {
            let mut d = Decoder::with_limit(256);
            for chunk in &chunks {
                match d.feed(chunk) {
                    Ok(Decoded::Complete(m)) => {
                        let _ = respond(&m, |_| Some(keys()), &master(), &ServerOptions::default());
                        let _ = parse_response(&m, &Aead::ALL);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn every_response_fits_the_decoder_and_never_is_an_empty_success(
            records in prop::collection::vec(any_record(), 0..8),
        ) {
            let resp = respond(&Message { records }, |_| Some(keys()), &master(), &ServerOptions::default());
            let m = Message::decode(&resp).unwrap();
            match parse_response(&m, &Aead::ALL) {
                Ok(ok) => prop_assert_eq!(ok.cookies.len(), COOKIES_PER_RESPONSE),
                Err(e) => prop_assert!(matches!(
                    e,
                    KeError::ServerError(_) | KeError::NoCommonProtocol | KeError::NoCommonAead
                )),
            }
        }
    }
}
