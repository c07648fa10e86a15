//! The datagram format: one message per UDP datagram.
//!
//! Every datagram starts with a 4-byte header, then a body encoded with
//! `postcard` (varints, zigzag for signed values). `docs/PROTOCOL.md` is
//! the reference; in short:
//!
//! ```text
//! byte 0..2  magic "cf"
//! byte 2     version (1)
//! byte 3     kind: 1 request, 2 cancel, 3 response; +0x80 if authenticated
//! byte 4..   body (postcard), then zero padding
//! [then, if authenticated: key id (4 bytes) and tag (16 bytes), see crate::auth]
//! ```
//!
//! Bytes from the network are decoded into the mirror types here, never
//! straight into tarpc's types: the decoder checks sizes, kinds and padding,
//! and the deadline a client asks for is clamped to [`MAX_DEADLINE`] before
//! anything downstream (tarpc's timer wheel, `Instant` arithmetic) sees it.
//!
//! **No amplification.** A client pads every datagram it sends to at least
//! [`MIN_REQUEST_LEN`] bytes, servers ignore shorter ones, and every reply
//! fits in that size ([`MAX_REPLY_LEN`] ≤ [`MIN_REQUEST_LEN`]; error details
//! are cut to fit). A spoofed request therefore never draws a reply larger
//! than itself.

use crate::auth::{Key, Keys, TAG_LEN, TRAILER_LEN, Tag};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The largest datagram either side sends or accepts: fits the IPv6
/// minimum MTU (1280) with room for the IP and UDP headers.
pub const MAX_DATAGRAM: usize = 1200;
/// Client datagrams shorter than this are dropped by servers.
pub const MIN_REQUEST_LEN: usize = 48;
/// The largest reply body a server sends for a request of
/// [`MIN_REQUEST_LEN`] bytes.
pub const MAX_REPLY_LEN: usize = MIN_REQUEST_LEN;
/// The longest deadline a server honours; longer ones are cut to this.
pub const MAX_DEADLINE: Duration = Duration::from_secs(30);

const MAGIC: [u8; 2] = *b"cf";
/// Set in the kind byte of an authenticated datagram.
const AUTH_BIT: u8 = 0x80;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
const HEADER_LEN: usize = 4;

/// The kind byte of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Request = 1,
    Cancel = 2,
    Response = 3,
}

/// A datagram from client to server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// Call a method.
    Request {
        /// Chosen by the client, unique among its calls in flight.
        id: u64,
        /// How long the client will wait, already clamped to [`MAX_DEADLINE`]
        /// when decoded.
        deadline: Duration,
        /// The method and its arguments.
        call: Call,
    },
    /// The client no longer wants the answer to request `id`.
    Cancel {
        /// The request to cancel.
        id: u64,
    },
}

/// A method call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// `probe(ts1)`.
    Probe {
        /// The client's clock when the request left.
        ts1: Timestamp,
    },
    /// `now()`.
    Now,
}

/// A datagram from server to client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// The request this answers.
    pub id: u64,
    /// The answer.
    pub reply: Reply,
}

/// A method's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The answer to `probe`.
    Probe {
        /// Echo of the request's ts1.
        ts1: Timestamp,
        /// Server clock at receipt.
        ts2: Timestamp,
        /// Server clock at sending.
        ts3: Timestamp,
    },
    /// The answer to `now`.
    Now {
        /// Server clock at sending.
        time: Timestamp,
    },
    /// The server refused or failed the call.
    Error {
        /// A coarse error class; see [`ErrorCode`].
        code: ErrorCode,
        /// A human-readable detail, cut to fit the datagram.
        detail: String,
    },
}

/// Error classes a server can report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Anything else.
    Other,
    /// The server is too busy (throttled or over its limits).
    Busy,
    /// The deadline passed before an answer was ready.
    TimedOut,
    /// The call was not understood.
    InvalidInput,
}

impl ErrorCode {
    /// The closest `std::io::ErrorKind`, for tarpc's `ServerError`.
    pub fn to_io_kind(self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self {
            ErrorCode::Other => K::Other,
            ErrorCode::Busy => K::WouldBlock,
            ErrorCode::TimedOut => K::TimedOut,
            ErrorCode::InvalidInput => K::InvalidInput,
        }
    }

    /// The class of an `std::io::ErrorKind`.
    pub fn from_io_kind(kind: std::io::ErrorKind) -> Self {
        use std::io::ErrorKind as K;
        match kind {
            K::WouldBlock => ErrorCode::Busy,
            K::TimedOut => ErrorCode::TimedOut,
            K::InvalidInput | K::InvalidData => ErrorCode::InvalidInput,
            _ => ErrorCode::Other,
        }
    }
}

/// Why a datagram was not accepted. Each reason is counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_DATAGRAM`].
    #[error("oversized datagram")]
    Oversized,
    /// A client datagram shorter than [`MIN_REQUEST_LEN`].
    #[error("unpadded request (shorter than {MIN_REQUEST_LEN} bytes)")]
    Unpadded,
    /// Not our protocol (wrong magic or too short for a header).
    #[error("not a cerv datagram (bad magic)")]
    BadMagic,
    /// Our protocol, another version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A kind byte this side does not accept.
    #[error("unexpected datagram kind {0}")]
    Kind(u8),
    /// The body does not decode.
    #[error("malformed body")]
    Malformed,
    /// Non-zero bytes after the body.
    #[error("trailing bytes after the body")]
    Trailing,
    /// Authentication failed.
    #[error("authentication failed: {0}")]
    Auth(AuthError),
}

/// Why an authenticated exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Keys are in use, and the datagram carries no tag.
    #[error("no tag")]
    Missing,
    /// The datagram carries a tag, and this side has no keys.
    #[error("tagged, but no keys are configured")]
    Unexpected,
    /// The key id is not one of ours.
    #[error("unknown key id {0}")]
    UnknownKey(u32),
    /// The tag does not match the datagram.
    #[error("bad tag")]
    BadTag,
    /// A reply for no request we sent.
    #[error("reply to no request sent")]
    Unmatched,
}

/// How a request was authenticated: the key and the request's tag, which
/// the reply's tag covers too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// The key used.
    pub key_id: u32,
    /// The request's tag.
    pub tag: Tag,
}

/// The encoded body of a request on the wire (the deadline in microseconds).
#[derive(Serialize, Deserialize)]
struct RequestBody {
    id: u64,
    deadline_us: u32,
    call: Call,
}

#[derive(Serialize, Deserialize)]
struct CancelBody {
    id: u64,
}

/// A buffer large enough for any datagram.
pub type DatagramBuf = [u8; MAX_DATAGRAM];

fn write_header(buf: &mut [u8], kind: Kind) {
    buf[..2].copy_from_slice(&MAGIC);
    buf[2] = VERSION;
    buf[3] = kind as u8;
}

/// Encodes a client datagram, padded to [`MIN_REQUEST_LEN`] and, with a
/// key, followed by the key id and tag; returns its length and its tag.
/// The deadline saturates at what the wire holds (about 71 min).
pub fn encode_client(
    frame: &ClientFrame,
    buf: &mut DatagramBuf,
    key: Option<&Key>,
) -> (usize, Option<Tag>) {
    let (header, body) = buf.split_at_mut(HEADER_LEN);
    let written = match frame {
        ClientFrame::Request { id, deadline, call } => {
            let body_value = RequestBody {
                id: *id,
                deadline_us: u32::try_from(deadline.as_micros()).unwrap_or(u32::MAX),
                call: *call,
            };
            codec::put_request(&body_value, body)
        }
        ClientFrame::Cancel { id } => codec::put_cancel(&CancelBody { id: *id }, body),
    };
    // The largest request body is about 30 bytes, far below the buffer.
    let len = HEADER_LEN + written;
    let kind_byte = match frame {
        ClientFrame::Request { .. } => Kind::Request,
        ClientFrame::Cancel { .. } => Kind::Cancel,
    };
    write_header(header, kind_byte);
    let padded = len.max(MIN_REQUEST_LEN);
    buf[len..padded].fill(0);
    match key {
        None => (padded, None),
        Some(key) => {
            buf[3] |= AUTH_BIT;
            let tag = sign(key, buf, padded, None);
            (padded + TRAILER_LEN, Some(tag))
        }
    }
}

/// Appends the key id and the tag of `buf[..plain]` (and of `bound_to`,
/// for a reply) after `plain`; returns the tag.
fn sign(key: &Key, buf: &mut [u8], plain: usize, bound_to: Option<&Tag>) -> Tag {
    buf[plain..plain + 4].copy_from_slice(&key.id().to_le_bytes());
    let signed = &buf[..plain + 4];
    let tag = match bound_to {
        Some(request) => key.tag(&[signed, request]),
        None => key.tag(&[signed]),
    };
    buf[plain + 4..plain + TRAILER_LEN].copy_from_slice(&tag);
    tag
}

/// Splits an authenticated datagram into the part its tag covers, the key
/// id and the tag.
fn split_trailer(bytes: &[u8]) -> Option<(&[u8], u32, &[u8])> {
    let plain_len = bytes.len().checked_sub(TRAILER_LEN)?;
    let (signed, tag) = bytes.split_at(plain_len + 4);
    let id_bytes: [u8; 4] = signed[plain_len..].try_into().ok()?;
    Some((signed, u32::from_le_bytes(id_bytes), tag))
}

/// Checks size, magic and version; returns the kind and whether the
/// datagram says it is authenticated.
fn check_header(bytes: &[u8]) -> Result<(u8, bool), DecodeError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::Oversized);
    }
    if bytes.len() < HEADER_LEN || bytes[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if bytes[2] != VERSION {
        return Err(DecodeError::Version(bytes[2]));
    }
    Ok((bytes[3] & !AUTH_BIT, bytes[3] & AUTH_BIT != 0))
}

/// Decodes the body after the header with `take` (which returns the value
/// and what follows it), and checks that only zero padding follows.
fn body<'a, T>(
    bytes: &'a [u8],
    take: impl FnOnce(&'a [u8]) -> Option<(T, &'a [u8])>,
) -> Result<T, DecodeError> {
    // A tagged datagram's plain part can be shorter than a header when the
    // trailer overlaps it; never index past what is there.
    let after_header = bytes.get(HEADER_LEN..).ok_or(DecodeError::Malformed)?;
    let (value, rest) = take(after_header).ok_or(DecodeError::Malformed)?;
    if !all_zero(rest) {
        return Err(DecodeError::Trailing);
    }
    Ok(value)
}

/// Whether every byte of `bytes` is zero: an OR over them, not a search
/// for the first that is not, eight bytes at a time (the last eight
/// overlap the others, so no byte is left for a loop of its own).
fn all_zero(bytes: &[u8]) -> bool {
    let word = |w: &[u8; 8]| u64::from_ne_bytes(*w);
    match bytes.last_chunk::<8>() {
        Some(last) => {
            let (words, _) = bytes.as_chunks::<8>();
            words.iter().fold(word(last), |acc, w| acc | word(w)) == 0
        }
        None => bytes.iter().fold(0, |acc, &b| acc | b) == 0,
    }
}

/// Decodes and validates a datagram a server received. With `keys`, only
/// datagrams tagged with one of them are accepted (and their tag is
/// checked before anything else); without, only untagged ones.
pub fn decode_client(
    bytes: &[u8],
    keys: Option<&Keys>,
) -> Result<(ClientFrame, Option<Authenticated>), DecodeError> {
    let (kind, tagged) = check_header(bytes)?;
    let (plain, auth) = match (tagged, keys) {
        (false, None) => (bytes, None),
        (false, Some(_)) => return Err(DecodeError::Auth(AuthError::Missing)),
        (true, None) => return Err(DecodeError::Auth(AuthError::Unexpected)),
        (true, Some(keys)) => {
            if bytes.len() < MIN_REQUEST_LEN + TRAILER_LEN {
                return Err(DecodeError::Unpadded);
            }
            let Some((signed, key_id, tag)) = split_trailer(bytes) else {
                return Err(DecodeError::Unpadded);
            };
            let key = keys
                .get(key_id)
                .ok_or(DecodeError::Auth(AuthError::UnknownKey(key_id)))?;
            if !key.verify(&[signed], tag) {
                return Err(DecodeError::Auth(AuthError::BadTag));
            }
            let mut request_tag = [0u8; TAG_LEN];
            request_tag.copy_from_slice(tag);
            let plain = &bytes[..bytes.len() - TRAILER_LEN];
            (
                plain,
                Some(Authenticated {
                    key_id,
                    tag: request_tag,
                }),
            )
        }
    };
    if plain.len() < MIN_REQUEST_LEN {
        return Err(DecodeError::Unpadded);
    }
    let frame = match kind {
        k if k == Kind::Request as u8 => {
            let RequestBody {
                id,
                deadline_us,
                call,
            } = body(plain, codec::take_request)?;
            let deadline = Duration::from_micros(u64::from(deadline_us)).min(MAX_DEADLINE);
            ClientFrame::Request { id, deadline, call }
        }
        k if k == Kind::Cancel as u8 => {
            let CancelBody { id } = body(plain, codec::take_cancel)?;
            ClientFrame::Cancel { id }
        }
        other => return Err(DecodeError::Kind(other)),
    };
    Ok((frame, auth))
}

/// Encodes a reply into `buf`, which is as long as the reply may be (for
/// a server: [`MAX_REPLY_LEN`], plus [`TRAILER_LEN`] when authenticated);
/// returns its length, or `None` if it cannot fit. Error details are
/// shortened, on a character boundary, until the reply fits. With `auth`,
/// the reply is tagged with the key the request used, bound to the
/// request's tag.
pub fn encode_server(
    frame: &ServerFrame,
    buf: &mut [u8],
    auth: Option<(&Key, &Tag)>,
) -> Option<usize> {
    let trailer = if auth.is_some() { TRAILER_LEN } else { 0 };
    let limit = buf.len().min(MAX_DATAGRAM).checked_sub(trailer)?;
    if limit < HEADER_LEN {
        return None;
    }
    let try_encode = |frame: &ServerFrame, buf: &mut [u8]| {
        let len = codec::put_server_frame(frame, &mut buf[HEADER_LEN..limit])? + HEADER_LEN;
        (len <= limit).then_some(len)
    };
    let len = match try_encode(frame, buf) {
        Some(len) => len,
        None => {
            let Reply::Error { code, detail } = &frame.reply else {
                return None;
            };
            // Shorten the detail by what is over, then by one character at
            // a time for the varint length prefix.
            let mut keep = detail.len().min(limit.saturating_sub(HEADER_LEN + 16));
            loop {
                while !detail.is_char_boundary(keep) {
                    keep -= 1;
                }
                let shorter = ServerFrame {
                    id: frame.id,
                    reply: Reply::Error {
                        code: *code,
                        detail: detail[..keep].to_owned(),
                    },
                };
                if let Some(len) = try_encode(&shorter, buf) {
                    break len;
                }
                if keep == 0 {
                    return None;
                }
                keep -= 1;
            }
        }
    };
    write_header(&mut buf[..HEADER_LEN], Kind::Response);
    match auth {
        None => Some(len),
        Some((key, request_tag)) => {
            buf[3] |= AUTH_BIT;
            sign(key, buf, len, Some(request_tag));
            Some(len + TRAILER_LEN)
        }
    }
}

/// Decodes and validates a datagram a client received. With `key`, the
/// reply must be tagged with it, bound to the tag of the request it answers
/// (`request_tag` looks that up by request id); without, it must be
/// untagged.
pub fn decode_server(
    bytes: &[u8],
    key: Option<&Key>,
    request_tag: impl FnOnce(u64) -> Option<Tag>,
) -> Result<ServerFrame, DecodeError> {
    let (kind, tagged) = check_header(bytes)?;
    if kind != Kind::Response as u8 {
        return Err(DecodeError::Kind(kind));
    }
    match (tagged, key) {
        (false, None) => body(bytes, codec::take_server_frame),
        (false, Some(_)) => Err(DecodeError::Auth(AuthError::Missing)),
        (true, None) => Err(DecodeError::Auth(AuthError::Unexpected)),
        (true, Some(key)) => {
            if bytes.len() < HEADER_LEN + TRAILER_LEN {
                return Err(DecodeError::Malformed);
            }
            let (signed, key_id, tag) =
                split_trailer(bytes).ok_or(DecodeError::Auth(AuthError::BadTag))?;
            if key_id != key.id() {
                return Err(DecodeError::Auth(AuthError::UnknownKey(key_id)));
            }
            let frame: ServerFrame = body(
                &bytes[..bytes.len() - TRAILER_LEN],
                codec::take_server_frame,
            )?;
            let request = request_tag(frame.id).ok_or(DecodeError::Auth(AuthError::Unmatched))?;
            if !key.verify(&[signed, &request], tag) {
                return Err(DecodeError::Auth(AuthError::BadTag));
            }
            Ok(frame)
        }
    }
}

/// The bodies in postcard's encoding, written and read by hand for the
/// messages every exchange carries (a request, a probe's or `now`'s
/// reply): postcard through serde costs a server more per request than
/// everything else it does in user space. The bytes are postcard's, byte
/// for byte, and so is what is accepted: tests hold both directions to
/// postcard itself. Errors, rare and variable, go through postcard.
///
/// postcard writes an unsigned integer as a varint (7 bits a byte, least
/// significant first, the top bit set on every byte but the last), a
/// signed one zigzagged first, an enum as its variant's index (a varint)
/// followed by its fields, a struct as its fields in order.
mod codec {
    use super::{Call, CancelBody, Reply, RequestBody, ServerFrame};
    use crate::time::Timestamp;

    /// Reads postcard's primitives from the front of a slice.
    struct Take<'a>(&'a [u8]);

    impl<'a> Take<'a> {
        /// A varint of at most `max` bytes whose last byte holds at most
        /// `last` (what is left of the type's bits), as postcard reads it.
        fn varint(&mut self, max: usize, last: u8) -> Option<u64> {
            let mut out = 0u64;
            for (i, &byte) in self.0.iter().take(max).enumerate() {
                out |= u64::from(byte & 0x7f) << (7 * i);
                if byte & 0x80 == 0 {
                    self.0 = &self.0[i + 1..];
                    return (i < max - 1 || byte <= last).then_some(out);
                }
            }
            None
        }

        fn u64(&mut self) -> Option<u64> {
            // A word at a time where eight bytes are there to read: the
            // first byte without the continuation bit ends the varint.
            let Some(word) = self.0.first_chunk::<8>().map(|w| u64::from_le_bytes(*w)) else {
                return self.varint(10, 0x01);
            };
            let ends = !word & CONTINUATION;
            if ends != 0 {
                let n = ends.trailing_zeros() as usize / 8 + 1;
                let keep = if n == 8 { u64::MAX } else { (1 << (8 * n)) - 1 };
                self.0 = &self.0[n..];
                return Some(compact(word & keep & !CONTINUATION));
            }
            // Nine or ten bytes: the ninth holds bits 56 to 62, the tenth
            // bit 63 (and nothing more, or the value is too large).
            let low = compact(word & !CONTINUATION);
            let &ninth = self.0.get(8)?;
            if ninth & 0x80 == 0 {
                self.0 = &self.0[9..];
                return Some(low | u64::from(ninth) << 56);
            }
            let &tenth = self.0.get(9)?;
            if tenth > 0x01 {
                return None;
            }
            self.0 = &self.0[10..];
            Some(low | u64::from(ninth & 0x7f) << 56 | u64::from(tenth) << 63)
        }

        fn u32(&mut self) -> Option<u32> {
            // Bits past 32 in the fifth byte are refused by `last`.
            self.varint(5, 0x0f).map(|v| v as u32)
        }

        fn i64(&mut self) -> Option<i64> {
            let z = self.u64()?;
            Some((z >> 1) as i64 ^ -((z & 1) as i64))
        }

        fn timestamp(&mut self) -> Option<Timestamp> {
            self.i64().map(Timestamp::from_nanos)
        }
    }

    /// The continuation bit of each of eight varint bytes in a word.
    const CONTINUATION: u64 = 0x8080_8080_8080_8080;
    const LOW_56: u64 = (1 << 56) - 1;

    /// The low 56 bits of `x`, seven to a byte (bit 7 of each byte clear).
    fn spread(x: u64) -> u64 {
        let x = (x & 0x0000_0000_0FFF_FFFF) | ((x & 0x00FF_FFFF_F000_0000) << 4);
        let x = (x & 0x0000_3FFF_0000_3FFF) | ((x & 0x0FFF_C000_0FFF_C000) << 2);
        (x & 0x007F_007F_007F_007F) | ((x & 0x3F80_3F80_3F80_3F80) << 1)
    }

    /// The inverse of [`spread`]: seven bits from each byte, packed.
    fn compact(x: u64) -> u64 {
        let x = (x & 0x007F_007F_007F_007F) | ((x & 0x7F00_7F00_7F00_7F00) >> 1);
        let x = (x & 0x0000_3FFF_0000_3FFF) | ((x & 0x3FFF_0000_3FFF_0000) >> 2);
        (x & 0x0000_0000_0FFF_FFFF) | ((x & 0x0FFF_FFFF_0000_0000) >> 4)
    }

    /// Writes postcard's primitives at the front of a slice.
    struct Put<'a> {
        out: &'a mut [u8],
        len: usize,
    }

    impl Put<'_> {
        fn u64(&mut self, mut v: u64) -> Option<()> {
            // 1 to 10 bytes: one for every 7 significant bits.
            let n = (64 - (v | 1).leading_zeros() as usize).div_ceil(7);
            if let Some(room) = self.out.get_mut(self.len..self.len + 10) {
                // A word at a time where there is room for the longest:
                // the low 56 bits seven to a byte, the continuation bit on
                // every byte but the last; bytes past the varint are
                // scratch the next field overwrites.
                let cont = if n > 8 {
                    CONTINUATION
                } else {
                    CONTINUATION & ((1 << (8 * (n - 1))) - 1)
                };
                room[..8].copy_from_slice(&(spread(v & LOW_56) | cont).to_le_bytes());
                room[8] = ((v >> 56) as u8 & 0x7f) | if n > 9 { 0x80 } else { 0 };
                room[9] = (v >> 63) as u8;
                self.len += n;
                return Some(());
            }
            let (last, head) = self.out.get_mut(self.len..self.len + n)?.split_last_mut()?;
            for byte in head {
                *byte = (v as u8) | 0x80;
                v >>= 7;
            }
            *last = v as u8;
            self.len += n;
            Some(())
        }

        fn i64(&mut self, v: i64) -> Option<()> {
            self.u64(((v << 1) ^ (v >> 63)) as u64)
        }
    }

    /// A request body and what follows it.
    pub(super) fn take_request(bytes: &[u8]) -> Option<(RequestBody, &[u8])> {
        let mut t = Take(bytes);
        let id = t.u64()?;
        let deadline_us = t.u32()?;
        let call = match t.u32()? {
            0 => Call::Probe {
                ts1: t.timestamp()?,
            },
            1 => Call::Now,
            _ => return None,
        };
        Some((
            RequestBody {
                id,
                deadline_us,
                call,
            },
            t.0,
        ))
    }

    /// A cancel body and what follows it.
    pub(super) fn take_cancel(bytes: &[u8]) -> Option<(CancelBody, &[u8])> {
        let mut t = Take(bytes);
        let id = t.u64()?;
        Some((CancelBody { id }, t.0))
    }

    /// A reply body and what follows it.
    pub(super) fn take_server_frame(bytes: &[u8]) -> Option<(ServerFrame, &[u8])> {
        let mut t = Take(bytes);
        let id = t.u64()?;
        let reply = match t.u32()? {
            0 => Reply::Probe {
                ts1: t.timestamp()?,
                ts2: t.timestamp()?,
                ts3: t.timestamp()?,
            },
            1 => Reply::Now {
                time: t.timestamp()?,
            },
            // An error: postcard reads it (its text is checked as UTF-8).
            _ => return postcard::take_from_bytes(bytes).ok(),
        };
        Some((ServerFrame { id, reply }, t.0))
    }

    /// Writes a request body; returns its length. The buffer is always
    /// large enough (at most 26 bytes).
    pub(super) fn put_request(body: &RequestBody, out: &mut [u8]) -> usize {
        let mut p = Put { out, len: 0 };
        let fits = (|| {
            p.u64(body.id)?;
            p.u64(body.deadline_us.into())?;
            match body.call {
                Call::Probe { ts1 } => {
                    p.u64(0)?;
                    p.i64(ts1.as_nanos())
                }
                Call::Now => p.u64(1),
            }
        })();
        if fits.is_some() { p.len } else { 0 }
    }

    /// Writes a cancel body; returns its length.
    pub(super) fn put_cancel(body: &CancelBody, out: &mut [u8]) -> usize {
        let mut p = Put { out, len: 0 };
        if p.u64(body.id).is_some() { p.len } else { 0 }
    }

    /// Writes a reply body; returns its length, `None` if it does not fit.
    pub(super) fn put_server_frame(frame: &ServerFrame, out: &mut [u8]) -> Option<usize> {
        let mut p = Put { out, len: 0 };
        match frame.reply {
            Reply::Probe { ts1, ts2, ts3 } => {
                p.u64(frame.id)?;
                p.u64(0)?;
                p.i64(ts1.as_nanos())?;
                p.i64(ts2.as_nanos())?;
                p.i64(ts3.as_nanos())?;
            }
            Reply::Now { time } => {
                p.u64(frame.id)?;
                p.u64(1)?;
                p.i64(time.as_nanos())?;
            }
            Reply::Error { .. } => return postcard::to_slice(frame, p.out).ok().map(|b| b.len()),
        }
        Some(p.len)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::wire::ErrorCode;
        use proptest::prelude::*;

        fn timestamp() -> impl Strategy<Value = Timestamp> {
            prop_oneof![
                Just(i64::MIN),
                Just(i64::MAX),
                Just(0),
                Just(-1),
                any::<i64>()
            ]
            .prop_map(Timestamp::from_nanos)
        }

        fn call() -> impl Strategy<Value = Call> {
            prop_oneof![
                timestamp().prop_map(|ts1| Call::Probe { ts1 }),
                Just(Call::Now)
            ]
        }

        fn reply() -> impl Strategy<Value = Reply> {
            prop_oneof![
                (timestamp(), timestamp(), timestamp()).prop_map(|(ts1, ts2, ts3)| Reply::Probe {
                    ts1,
                    ts2,
                    ts3
                }),
                timestamp().prop_map(|time| Reply::Now { time }),
                (0..4u8, ".{0,40}").prop_map(|(code, detail)| Reply::Error {
                    code: [
                        ErrorCode::Other,
                        ErrorCode::Busy,
                        ErrorCode::TimedOut,
                        ErrorCode::InvalidInput
                    ][usize::from(code)],
                    detail,
                }),
            ]
        }

        fn id() -> impl Strategy<Value = u64> {
            prop_oneof![Just(0), Just(u64::MAX), Just(127), Just(128), any::<u64>()]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4096))]

            #[test]
            fn requests_are_written_as_postcard_writes_them(
                id in id(),
                deadline_us in prop_oneof![Just(u32::MAX), any::<u32>()],
                call in call(),
            ) {
                let body = RequestBody { id, deadline_us, call };
                let mut ours = [0u8; 64];
                let n = put_request(&body, &mut ours);
                let mut theirs = [0u8; 64];
                let expected = postcard::to_slice(&body, &mut theirs).unwrap();
                prop_assert_eq!(&ours[..n], &*expected);
                let (back, rest) = take_request(&ours[..n]).unwrap();
                prop_assert_eq!((back.id, back.deadline_us, back.call), (id, deadline_us, call));
                prop_assert!(rest.is_empty());

                let mut ours = [0u8; 16];
                let n = put_cancel(&CancelBody { id }, &mut ours);
                let mut theirs = [0u8; 16];
                prop_assert_eq!(&ours[..n], &*postcard::to_slice(&CancelBody { id }, &mut theirs).unwrap());
            }

            #[test]
            fn replies_are_written_as_postcard_writes_them(id in id(), reply in reply()) {
                let frame = ServerFrame { id, reply };
                let mut ours = [0u8; 128];
                let n = put_server_frame(&frame, &mut ours).unwrap();
                let mut theirs = [0u8; 128];
                let expected = postcard::to_slice(&frame, &mut theirs).unwrap();
                prop_assert_eq!(&ours[..n], &*expected);
                let (back, rest) = take_server_frame(&ours[..n]).unwrap();
                prop_assert_eq!(&back, &frame);
                prop_assert!(rest.is_empty());
                // A buffer one byte short is refused, not overrun.
                prop_assert!(put_server_frame(&frame, &mut ours[..n - 1]).is_none());
            }

            /// Whatever the bytes, ours and postcard's readers agree: the
            /// same value and the same rest, or both refuse.
            #[test]
            fn any_bytes_are_read_as_postcard_reads_them(
                bytes in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..40),
                    // Long varints, the edges of the last byte's room.
                    prop::collection::vec(prop_oneof![Just(0xffu8), Just(0x80), Just(0x01), Just(0x02), Just(0x0f), Just(0x10)], 0..40),
                ],
            ) {
                let ours = take_request(&bytes).map(|(b, rest)| ((b.id, b.deadline_us, b.call), rest));
                let theirs = postcard::take_from_bytes::<RequestBody>(&bytes)
                    .ok()
                    .map(|(b, rest)| ((b.id, b.deadline_us, b.call), rest));
                prop_assert_eq!(ours, theirs);
                let ours = take_cancel(&bytes).map(|(b, rest)| (b.id, rest));
                let theirs = postcard::take_from_bytes::<CancelBody>(&bytes).ok().map(|(b, rest)| (b.id, rest));
                prop_assert_eq!(ours, theirs);
                let ours = take_server_frame(&bytes);
                let theirs = postcard::take_from_bytes::<ServerFrame>(&bytes).ok();
                prop_assert_eq!(ours, theirs);
            }
        }

        #[test]
        fn every_length_of_varint_both_ways() {
            // Each length from 1 to 10 bytes, at its smallest and largest
            // value, written and read with room to spare (a word at a
            // time) and without (a byte at a time), against postcard.
            let mut values = vec![0u64, u64::MAX];
            for bits in (7..64).step_by(7) {
                values.extend([(1u64 << bits) - 1, 1u64 << bits]);
            }
            for v in values {
                let mut theirs = [0u8; 16];
                let want = postcard::to_slice(&v, &mut theirs).unwrap().to_vec();
                for room in [want.len(), want.len() + 10] {
                    let mut out = vec![0u8; room];
                    let mut p = Put {
                        out: &mut out,
                        len: 0,
                    };
                    p.u64(v).unwrap();
                    let len = p.len;
                    assert_eq!(&out[..len], &want[..], "{v:#x} in {room}");
                    let mut padded = want.clone();
                    padded.resize(room, 0xAA);
                    let mut t = Take(&padded);
                    assert_eq!(t.u64(), Some(v), "{v:#x}");
                    assert_eq!(t.0.len(), room - want.len());
                }
                assert_eq!(compact(spread(v & LOW_56)), v & LOW_56);
            }
        }

        #[test]
        fn the_edges_of_a_varint() {
            // u64::MAX takes ten bytes, the last holding one bit.
            let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
            assert_eq!(Take(&max).u64(), Some(u64::MAX));
            let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
            assert_eq!(Take(&over).u64(), None);
            let eleven = [0x80; 11];
            assert_eq!(Take(&eleven).u64(), None);
            // The same with bytes after them (the word-at-a-time path).
            let mut max_more = max.to_vec();
            max_more.extend([0u8; 6]);
            assert_eq!(Take(&max_more).u64(), Some(u64::MAX));
            let mut over_more = over.to_vec();
            over_more.extend([0u8; 6]);
            assert_eq!(Take(&over_more).u64(), None);
            assert_eq!(Take(&[0x80; 16]).u64(), None);
            // A u32's fifth byte holds four bits.
            assert_eq!(Take(&[0xff, 0xff, 0xff, 0xff, 0x0f]).u32(), Some(u32::MAX));
            assert_eq!(Take(&[0xff, 0xff, 0xff, 0xff, 0x10]).u32(), None);
            // Not the shortest form, but postcard takes it, and so do we.
            assert_eq!(Take(&[0x80, 0x00]).u64(), Some(0));
            assert_eq!(Take(&[]).u64(), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn buf() -> DatagramBuf {
        [0xAA; MAX_DATAGRAM]
    }

    fn enc(frame: &ClientFrame, buf: &mut DatagramBuf) -> usize {
        encode_client(frame, buf, None).0
    }

    fn dec_c(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
        decode_client(bytes, None).map(|(frame, _)| frame)
    }

    fn enc_s(frame: &ServerFrame, buf: &mut [u8]) -> Option<usize> {
        encode_server(frame, buf, None)
    }

    fn dec_s(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
        decode_server(bytes, None, |_| None)
    }

    fn largest_replies() -> Vec<ServerFrame> {
        let extreme = [i64::MIN, i64::MAX, -1, 0];
        let mut out = Vec::new();
        for t in extreme {
            let t = Timestamp::from_nanos(t);
            out.push(ServerFrame {
                id: u64::MAX,
                reply: Reply::Probe {
                    ts1: t,
                    ts2: t,
                    ts3: t,
                },
            });
            out.push(ServerFrame {
                id: u64::MAX,
                reply: Reply::Now { time: t },
            });
        }
        out.push(ServerFrame {
            id: u64::MAX,
            reply: Reply::Error {
                code: ErrorCode::Busy,
                detail: "x".repeat(2000),
            },
        });
        out
    }

    #[test]
    fn requests_round_trip_and_are_padded() {
        let frames = [
            ClientFrame::Request {
                id: 0,
                deadline: Duration::from_millis(500),
                call: Call::Probe {
                    ts1: Timestamp::from_nanos(1_790_000_000_123_456_789),
                },
            },
            ClientFrame::Request {
                id: u64::MAX,
                deadline: MAX_DEADLINE,
                call: Call::Now,
            },
            ClientFrame::Cancel { id: 7 },
        ];
        for frame in frames {
            let mut b = buf();
            let len = enc(&frame, &mut b);
            assert_eq!(len, MIN_REQUEST_LEN);
            assert_eq!(&b[..3], b"cf\x01");
            assert_eq!(dec_c(&b[..len]), Ok(frame));
        }
    }

    #[test]
    fn matches_the_example_in_protocol_md() {
        let mut b = buf();
        let len = enc(
            &ClientFrame::Request {
                id: 5,
                deadline: Duration::from_millis(500),
                call: Call::Probe {
                    ts1: Timestamp::from_nanos(1),
                },
            },
            &mut b,
        );
        let mut want = vec![0x63, 0x66, 0x01, 0x01, 0x05, 0xa0, 0xc2, 0x1e, 0x00, 0x02];
        want.resize(MIN_REQUEST_LEN, 0);
        assert_eq!(&b[..len], &want[..]);
    }

    #[test]
    fn every_reply_fits_the_smallest_request() {
        for frame in largest_replies() {
            let mut b = buf();
            let len = enc_s(&frame, &mut b[..MIN_REQUEST_LEN]).expect("fits");
            assert!(len <= MAX_REPLY_LEN, "{frame:?} is {len} bytes");
            let back = dec_s(&b[..len]).unwrap();
            assert_eq!(back.id, frame.id);
            if let (Reply::Error { detail, .. }, Reply::Error { detail: long, .. }) =
                (&back.reply, &frame.reply)
            {
                assert!(long.starts_with(detail.as_str()) && !detail.is_empty());
            } else {
                assert_eq!(back, frame);
            }
        }
    }

    #[test]
    fn error_details_are_cut_on_character_boundaries() {
        let frame = ServerFrame {
            id: 1,
            reply: Reply::Error {
                code: ErrorCode::Other,
                detail: "é".repeat(100),
            },
        };
        let mut b = buf();
        let len = enc_s(&frame, &mut b[..MIN_REQUEST_LEN]).unwrap();
        let Reply::Error { detail, .. } = dec_s(&b[..len]).unwrap().reply else {
            panic!("not an error")
        };
        assert!(detail.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_reply_that_cannot_fit_is_refused() {
        let frame = ServerFrame {
            id: 1,
            reply: Reply::Now {
                time: Timestamp::from_nanos(i64::MAX),
            },
        };
        assert_eq!(enc_s(&frame, &mut buf()[..8]), None);
    }

    #[test]
    fn deadlines_are_clamped() {
        let frame = ClientFrame::Request {
            id: 3,
            deadline: Duration::from_secs(3600),
            call: Call::Now,
        };
        let mut b = buf();
        let len = enc(&frame, &mut b);
        let ClientFrame::Request { deadline, .. } = dec_c(&b[..len]).unwrap() else {
            panic!()
        };
        assert_eq!(deadline, MAX_DEADLINE);
    }

    #[test]
    fn bad_datagrams_are_named() {
        let mut good = buf();
        let len = enc(&ClientFrame::Cancel { id: 1 }, &mut good);
        let good = &good[..len];
        let with = |i: usize, v: u8| {
            let mut d = good.to_vec();
            d[i] = v;
            d
        };
        assert_eq!(dec_c(&[0; 1201]), Err(DecodeError::Oversized));
        assert_eq!(dec_c(b"cf"), Err(DecodeError::BadMagic));
        assert_eq!(dec_c(&with(0, b'x')), Err(DecodeError::BadMagic));
        assert_eq!(dec_c(&with(2, 9)), Err(DecodeError::Version(9)));
        assert_eq!(dec_c(&with(3, 3)), Err(DecodeError::Kind(3)));
        assert_eq!(dec_c(&with(3, 0)), Err(DecodeError::Kind(0)));
        assert_eq!(dec_c(&with(47, 1)), Err(DecodeError::Trailing));
        assert_eq!(dec_c(&good[..20]), Err(DecodeError::Unpadded));
        // A request kind with a body that ends too early.
        let mut short = with(3, 1);
        short[4..].fill(0xFF);
        assert_eq!(dec_c(&short), Err(DecodeError::Malformed));
        // A server must not take a response, nor a client a request.
        let mut reply = buf();
        let n = enc_s(
            &ServerFrame {
                id: 1,
                reply: Reply::Now {
                    time: Timestamp::EPOCH,
                },
            },
            &mut reply[..MIN_REQUEST_LEN],
        )
        .unwrap();
        let mut padded = reply[..n].to_vec();
        padded.resize(MIN_REQUEST_LEN, 0);
        assert_eq!(dec_c(&padded), Err(DecodeError::Kind(3)));
        assert_eq!(dec_s(good), Err(DecodeError::Kind(2)));
    }

    fn key(id: u32, fill: u8) -> Key {
        Key::new(id, [fill; 32])
    }

    fn probe_request(id: u64) -> ClientFrame {
        ClientFrame::Request {
            id,
            deadline: Duration::from_millis(500),
            call: Call::Probe {
                ts1: Timestamp::from_nanos(1_790_000_000_000_000_000),
            },
        }
    }

    #[test]
    fn authenticated_requests_round_trip_and_resist_tampering() {
        let k = key(7, 1);
        let keys = Keys::single(k.clone());
        let mut b = buf();
        let (len, tag) = encode_client(&probe_request(3), &mut b, Some(&k));
        assert_eq!(len, MIN_REQUEST_LEN + TRAILER_LEN);
        let (frame, auth) = decode_client(&b[..len], Some(&keys)).unwrap();
        assert_eq!(frame, probe_request(3));
        assert_eq!(
            auth,
            Some(Authenticated {
                key_id: 7,
                tag: tag.unwrap()
            })
        );

        // Every single flipped bit is caught (the kind byte's auth bit
        // turns it into a malformed or unauthenticated datagram instead).
        for i in 0..len {
            for bit in 0..8 {
                let mut t = b[..len].to_vec();
                t[i] ^= 1 << bit;
                assert!(
                    decode_client(&t, Some(&keys)).is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
        let auth_err = |bytes: &[u8], keys| match decode_client(bytes, keys) {
            Err(DecodeError::Auth(e)) => Some(e),
            _ => None,
        };
        // A key we do not hold, no keys at all, no tag at all.
        let stranger = Keys::single(key(8, 1));
        assert_eq!(
            auth_err(&b[..len], Some(&stranger)),
            Some(AuthError::UnknownKey(7))
        );
        let same_id_other_secret = Keys::single(key(7, 2));
        assert_eq!(
            auth_err(&b[..len], Some(&same_id_other_secret)),
            Some(AuthError::BadTag)
        );
        assert_eq!(auth_err(&b[..len], None), Some(AuthError::Unexpected));
        let mut plain = buf();
        let (n, none) = encode_client(&probe_request(3), &mut plain, None);
        assert_eq!(none, None);
        assert_eq!(auth_err(&plain[..n], Some(&keys)), Some(AuthError::Missing));
        // A tagged datagram cut short is not padded.
        assert_eq!(
            decode_client(&b[..len - 1], Some(&keys)).map(|_| ()),
            Err(DecodeError::Unpadded)
        );
    }

    #[test]
    fn authenticated_replies_are_bound_to_their_request() {
        let k = key(7, 1);
        let mut b = buf();
        let (_, tag) = encode_client(&probe_request(3), &mut b, Some(&k));
        let request_tag = tag.unwrap();
        let reply = ServerFrame {
            id: 3,
            reply: Reply::Probe {
                ts1: Timestamp::from_nanos(i64::MIN),
                ts2: Timestamp::from_nanos(i64::MAX),
                ts3: Timestamp::from_nanos(i64::MAX),
            },
        };
        let mut out = buf();
        let len = encode_server(
            &reply,
            &mut out[..MAX_REPLY_LEN + TRAILER_LEN],
            Some((&k, &request_tag)),
        )
        .expect("the largest reply fits, tagged");
        assert!(
            len <= MIN_REQUEST_LEN + TRAILER_LEN,
            "a tagged reply of {len} bytes"
        );
        let bytes = &out[..len];
        assert_eq!(
            decode_server(bytes, Some(&k), |id| (id == 3).then_some(request_tag)),
            Ok(reply.clone())
        );
        // Presented as the answer to another request, it fails.
        let mut other = request_tag;
        other[0] ^= 1;
        assert_eq!(
            decode_server(bytes, Some(&k), |_| Some(other)),
            Err(DecodeError::Auth(AuthError::BadTag))
        );
        assert_eq!(
            decode_server(bytes, Some(&k), |_| None),
            Err(DecodeError::Auth(AuthError::Unmatched))
        );
        assert_eq!(
            decode_server(bytes, Some(&key(9, 1)), |_| Some(request_tag)),
            Err(DecodeError::Auth(AuthError::UnknownKey(7)))
        );
        assert_eq!(
            decode_server(bytes, None, |_| None),
            Err(DecodeError::Auth(AuthError::Unexpected))
        );
        let mut plain = buf();
        let n = encode_server(&reply, &mut plain[..MAX_REPLY_LEN], None).unwrap();
        assert_eq!(
            decode_server(&plain[..n], Some(&k), |_| Some(request_tag)),
            Err(DecodeError::Auth(AuthError::Missing))
        );
        // Tampering with any byte of a tagged reply is caught.
        for i in 0..len {
            let mut t = bytes.to_vec();
            t[i] ^= 0x10;
            assert!(
                decode_server(&t, Some(&k), |_| Some(request_tag)).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn a_trailer_overlapping_the_header_is_not_a_panic() {
        // Found by reading the code: a tagged reply of 20 bytes whose "key
        // id" is the header itself, checked by a client that happens to
        // hold a key with that id, used to index past the plain part.
        let mut d = vec![b'c', b'f', VERSION, Kind::Response as u8 | AUTH_BIT];
        let overlapping_id = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        d.extend([0u8; TAG_LEN]);
        let k = Key::new(overlapping_id, [5; 32]);
        assert!(decode_server(&d, Some(&k), |_| Some([0; TAG_LEN])).is_err());
        for n in 0..d.len() {
            let _ = decode_server(&d[..n], Some(&k), |_| Some([0; TAG_LEN]));
        }
        // And the same shape as a request, to a server holding that key.
        let mut r = d.clone();
        r[3] = Kind::Request as u8 | AUTH_BIT;
        assert!(decode_client(&r, Some(&Keys::single(k))).is_err());
    }

    proptest! {
        #[test]
        fn all_zero_is_every_byte_zero(len in 0usize..40, one in any::<Option<(usize, u8)>>()) {
            // Zeros, or zeros with one byte set anywhere (any of them).
            let mut bytes = vec![0u8; len];
            if let Some((at, value)) = one.filter(|_| len > 0) {
                bytes[at % len] = value;
            }
            prop_assert_eq!(all_zero(&bytes), bytes.iter().all(|&b| b == 0));
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1300)) {
            let _ = dec_c(&bytes);
            let _ = dec_s(&bytes);
            let keys = Keys::single(key(1, 3));
            let _ = decode_client(&bytes, Some(&keys));
            let _ = decode_server(&bytes, keys.first(), |_| Some([0; TAG_LEN]));
        }

        #[test]
        fn mutated_requests_decode_or_fail_cleanly(
            id in any::<u64>(),
            ts1 in any::<i64>(),
            at in 0usize..MIN_REQUEST_LEN,
            value in any::<u8>(),
        ) {
            let mut b = buf();
            let len = enc(&ClientFrame::Request {
                id,
                deadline: Duration::from_millis(250),
                call: Call::Probe { ts1: Timestamp::from_nanos(ts1) },
            }, &mut b);
            b[at] = value;
            if let Ok(ClientFrame::Request { deadline, .. }) = dec_c(&b[..len]) {
                prop_assert!(deadline <= MAX_DEADLINE);
            }
        }

        #[test]
        fn requests_round_trip(id in any::<u64>(), ts1 in any::<i64>(), us in any::<u32>()) {
            let frame = ClientFrame::Request {
                id,
                deadline: Duration::from_micros(u64::from(us)).min(MAX_DEADLINE),
                call: Call::Probe { ts1: Timestamp::from_nanos(ts1) },
            };
            let mut b = buf();
            let len = enc(&frame, &mut b);
            prop_assert_eq!(dec_c(&b[..len]), Ok(frame));
        }

        #[test]
        fn replies_round_trip(id in any::<u64>(), a in any::<i64>(), b in any::<i64>(), c in any::<i64>()) {
            let frame = ServerFrame {
                id,
                reply: Reply::Probe {
                    ts1: Timestamp::from_nanos(a),
                    ts2: Timestamp::from_nanos(b),
                    ts3: Timestamp::from_nanos(c),
                },
            };
            let mut buf = buf();
            let len = enc_s(&frame, &mut buf[..MIN_REQUEST_LEN]).unwrap();
            prop_assert!(len <= MIN_REQUEST_LEN);
            prop_assert_eq!(dec_s(&buf[..len]), Ok(frame));
        }
    }
}
