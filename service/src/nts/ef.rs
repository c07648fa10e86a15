//! NTS extension fields in NTPv4 packets (RFC 8915 §5), as pure functions
//! over datagrams.
//!
//! A request, as chrony and this module send it:
//!
//! ```text
//! header (48) · Unique Identifier (32 random bytes) · NTS Cookie
//!             · 0..7 × Cookie Placeholder (as long as the cookie)
//!             · NTS Authenticator: AEAD under c2s of nothing, over all before it
//! ```
//!
//! and the reply:
//!
//! ```text
//! header (48) · Unique Identifier (echoed)
//!             · NTS Authenticator: AEAD under s2c of the new cookies (as NTS
//!               Cookie fields), over all before it
//! ```
//!
//! The Authenticator and Encrypted Extension Fields field holds
//!
//! ```text
//! nonce length (16) | ciphertext length (16) | nonce, zero-padded to 4
//!                   | tag ‖ ciphertext, zero-padded to 4 | additional padding
//! ```
//!
//! where the additional padding makes nonce and its padding at least 16
//! bytes together (RFC 8915 §5.6; chrony refuses less). The associated
//! data is the packet from its first byte up to the authenticator, which
//! must be the last field: whatever follows it would be unauthenticated.
//!
//! Placeholders are why a reply is never larger than its request: each
//! asks for one more cookie and pays for its size in advance, so a spoofed
//! request cannot be amplified.
//!
//! A server that cannot open the cookie, or whose check of the
//! authenticator fails, answers with an NTS NAK: a Kiss-o'-Death `NTSN`
//! carrying the echoed Unique Identifier and nothing else (RFC 8915 §5.7;
//! chrony and ntpd-rs do both). The client, which cannot authenticate a
//! NAK, believes one only if it echoes the identifier of its request.
//! Anything else malformed is dropped without an answer.

use super::aead::{self, Key, NONCE_LEN, TAG_LEN};
use super::cookie::{CookieError, CookieKeys, MasterKeys};
use crate::ntp::{self, HEADER_LEN, Header, Mode, PacketError, RefId};

/// Extension field type: Unique Identifier.
pub const UNIQUE_IDENTIFIER: u16 = 0x0104;
/// Extension field type: NTS Cookie.
pub const COOKIE: u16 = 0x0204;
/// Extension field type: NTS Cookie Placeholder.
pub const COOKIE_PLACEHOLDER: u16 = 0x0304;
/// Extension field type: NTS Authenticator and Encrypted Extension Fields.
pub const AUTHENTICATOR: u16 = 0x0404;
/// Bytes of the unique identifier a client sends (RFC 8915 §5.3: at least
/// 32; chrony sends exactly 32 and wants exactly its own back).
pub const UID_LEN: usize = 32;
/// Most cookies one reply carries, and most a client holds.
pub const MAX_COOKIES: usize = 8;
/// Longest cookie accepted from a reply or sent in a request (chrony's
/// `NKE_MAX_COOKIE_LENGTH`).
pub const MAX_COOKIE_LEN: usize = super::ke::MAX_COOKIE_LEN;
/// Nonce plus its padding plus additional padding: at least this much.
const MIN_NONCE_AREA: usize = 16;

/// Why an NTS packet was refused, or could not be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NtsError {
    /// Not a well-formed NTPv4 packet of the expected mode.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// No Unique Identifier field.
    #[error("no unique identifier")]
    MissingUid,
    /// No NTS Cookie field.
    #[error("no NTS cookie")]
    MissingCookie,
    /// No Authenticator field.
    #[error("no NTS authenticator")]
    MissingAuthenticator,
    /// A field that may appear once appeared again.
    #[error("extension field {0:#06x} appears twice")]
    Duplicate(u16),
    /// A unique identifier shorter than 32 bytes.
    #[error("unique identifier of {0} bytes (at least {UID_LEN} required)")]
    ShortUid(usize),
    /// A cookie or placeholder not as long as the first of them (every
    /// placeholder must be exactly as long as the cookie).
    #[error("cookie placeholder of {found} bytes where the cookie's are {expected}")]
    PlaceholderLength {
        /// The value length of the first cookie or placeholder.
        expected: usize,
        /// The value length of a later one.
        found: usize,
    },
    /// Extension fields after the authenticator (they would be
    /// unauthenticated).
    #[error("extension fields after the NTS authenticator")]
    AuthenticatorNotLast,
    /// The authenticator's lengths do not fit its field.
    #[error("malformed NTS authenticator: {0}")]
    MalformedAuthenticator(&'static str),
    /// The decrypted extension fields are not extension fields.
    #[error("malformed encrypted extension fields")]
    MalformedPlaintext,
    /// The cookie did not open (the server answers with an NTS NAK).
    #[error(transparent)]
    Cookie(#[from] CookieError),
    /// The authenticator did not verify: wrong keys, or an altered packet.
    #[error("NTS authentication failed")]
    Authentication,
    /// The reply echoes another request's unique identifier.
    #[error("reply to another request (unique identifier mismatch)")]
    UidMismatch,
    /// A reply without an authenticator that is not an NTS NAK.
    #[error("unauthenticated reply")]
    Unauthenticated,
    /// The server sent an NTS NAK: it could not open our cookie or check
    /// our request. The client needs new keys and cookies (NTS-KE).
    #[error("NTS NAK: the server could not open our cookie")]
    Nak,
    /// More placeholders than make sense (a client holds at most eight
    /// cookies, one of them in the request).
    #[error("{0} cookie placeholders (at most {max} make sense)", max = MAX_COOKIES - 1)]
    TooManyPlaceholders(usize),
    /// A cookie that cannot be sent: empty or longer than
    /// [`MAX_COOKIE_LEN`].
    #[error("cookie of {0} bytes cannot be sent")]
    BadCookie(usize),
    /// `start` is not past the header, inside the buffer and a multiple
    /// of 4.
    #[error("extension fields cannot start at byte {0}")]
    BadStart(usize),
    /// The output buffer is too small.
    #[error("output buffer of {have} bytes, {need} needed")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The reply would be larger than the request.
    #[error("reply of {need} bytes would exceed the request's {max}")]
    ReplyTooLarge {
        /// Bytes the reply needs.
        need: usize,
        /// The request's length.
        max: usize,
    },
}

impl NtsError {
    /// Whether a server answers a request refused for this reason with an
    /// NTS NAK ([`write_nak`]): the cookie did not open, or the
    /// authenticator did not verify (RFC 8915 §5.7, and what chrony and
    /// ntpd-rs do). Everything else is dropped: a NAK is unauthenticated,
    /// and only a well-formed NTS request earns one.
    pub fn nak(&self) -> bool {
        matches!(self, NtsError::Cookie(_) | NtsError::Authentication)
    }
}

/// Appends the NTS fields of a request after the `start` bytes the caller
/// already wrote into `out` (the header, and any fields of its own, all
/// of which the authenticator covers): the unique identifier, the
/// cookie, `placeholders` placeholders as long as the cookie, and the
/// authenticator under `c2s` with `nonce`. Returns the request's length.
///
/// The header must be final: any later change breaks the authenticator.
/// Send `placeholders` = the cookies wanted back, less the one this
/// request's cookie brings (see [`super::CookieJar::placeholders`]).
pub fn write_request(
    out: &mut [u8],
    start: usize,
    uid: &[u8; UID_LEN],
    cookie: &[u8],
    placeholders: usize,
    c2s: &Key,
    nonce: &[u8; NONCE_LEN],
) -> Result<usize, NtsError> {
    check_start(start, out.len())?;
    if placeholders >= MAX_COOKIES {
        return Err(NtsError::TooManyPlaceholders(placeholders));
    }
    if cookie.is_empty() || cookie.len() > MAX_COOKIE_LEN {
        return Err(NtsError::BadCookie(cookie.len()));
    }
    let mut at = start;
    at += put_field(out, at, UNIQUE_IDENTIFIER, uid)?;
    let cookie_field = put_field(out, at, COOKIE, cookie)?;
    at += cookie_field;
    for _ in 0..placeholders {
        at += put_blank(out, at, COOKIE_PLACEHOLDER, cookie_field - 4)?;
    }
    at += put_authenticator(out, at, c2s, nonce, &[])?;
    Ok(at)
}

/// A request that authenticated, as the server needs it for the reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NtsRequest {
    /// The unique identifier, to echo (the field's whole value).
    pub uid: Vec<u8>,
    /// The session keys from the cookie: `s2c` protects the reply.
    pub keys: CookieKeys,
    /// How many new cookies to send: one for the cookie spent, one per
    /// placeholder, at most [`MAX_COOKIES`].
    pub cookies_wanted: usize,
    /// The request's length: no reply may be longer.
    pub request_len: usize,
}

/// The server's check of an NTS request: a well-formed NTPv4 client
/// packet with one unique identifier (32 bytes or more), one cookie that
/// opens under `master`, placeholders as long as the cookie, and, last, an
/// authenticator that verifies under the cookie's c2s key. Unknown fields
/// are allowed (the authenticator covers them). On error,
/// [`NtsError::nak`] says whether to answer with [`write_nak`].
pub fn open_request(packet: &[u8], master: &MasterKeys) -> Result<NtsRequest, NtsError> {
    open_parsed(packet, &ntp::parse_request(packet)?, master)
}

/// [`open_request`] for a packet the caller has parsed already (a server
/// parses every request once, to tell NTS from plain NTP).
pub fn open_parsed(
    packet: &[u8],
    request: &ntp::Request<'_>,
    master: &MasterKeys,
) -> Result<NtsRequest, NtsError> {
    if request.header.version != ntp::VERSION {
        return Err(PacketError::Version(request.header.version).into());
    }
    let mut uid = None;
    let mut cookie: Option<&[u8]> = None;
    let mut placeholders = 0usize;
    let mut slot_len = None;
    let mut auth = None;
    let last = request.fields.len().saturating_sub(1);
    for (i, (offset, field)) in with_offsets(&request.fields).enumerate() {
        match field.kind {
            UNIQUE_IDENTIFIER => {
                if uid.replace(field.value).is_some() {
                    return Err(NtsError::Duplicate(UNIQUE_IDENTIFIER));
                }
                if field.value.len() < UID_LEN {
                    return Err(NtsError::ShortUid(field.value.len()));
                }
            }
            COOKIE | COOKIE_PLACEHOLDER => {
                if field.kind == COOKIE {
                    if cookie.replace(field.value).is_some() {
                        return Err(NtsError::Duplicate(COOKIE));
                    }
                } else {
                    placeholders += 1;
                }
                same_length(&mut slot_len, field.value.len())?;
            }
            AUTHENTICATOR => {
                if i != last {
                    return Err(NtsError::AuthenticatorNotLast);
                }
                auth = Some((offset, field.value));
            }
            _ => {}
        }
    }
    let uid = uid.ok_or(NtsError::MissingUid)?;
    let cookie = cookie.ok_or(NtsError::MissingCookie)?;
    let (auth_offset, auth) = auth.ok_or(NtsError::MissingAuthenticator)?;
    let (nonce, ciphertext) = parse_authenticator(auth)?;
    let keys = master.open(cookie)?;
    let plain = decrypt(&keys.c2s, nonce, &packet[..auth_offset], ciphertext)?;
    // Placeholders may also travel encrypted (RFC 8915 allows it, and
    // chrony counts them too).
    for (kind, value) in inner_fields(&plain)? {
        if kind == COOKIE_PLACEHOLDER {
            same_length(&mut slot_len, value.len())?;
            placeholders += 1;
        }
    }
    Ok(NtsRequest {
        uid: uid.to_vec(),
        keys,
        cookies_wanted: (1 + placeholders).min(MAX_COOKIES),
        request_len: packet.len(),
    })
}

/// Appends the NTS fields of the reply to `req` after the `start` bytes
/// of header the caller already wrote into `out`: the echoed unique
/// identifier, and the authenticator under `s2c` with `nonce`, whose
/// encrypted part holds `new_cookies` as NTS Cookie fields. Returns the
/// reply's length, which never exceeds the request's
/// ([`NtsError::ReplyTooLarge`] instead): send at most
/// `req.cookies_wanted` cookies of this server's size and it always fits.
///
/// The header must be final, its transmit timestamp included: the
/// authenticator covers it. Seal the cookies before taking ts3.
pub fn write_reply<C: AsRef<[u8]>>(
    out: &mut [u8],
    start: usize,
    req: &NtsRequest,
    new_cookies: &[C],
    nonce: &[u8; NONCE_LEN],
) -> Result<usize, NtsError> {
    check_start(start, out.len())?;
    // The cookie fields, to be encrypted: no larger than the request,
    // which is no larger than a datagram.
    let mut room = [0u8; crate::wire::MAX_DATAGRAM];
    let mut len = 0;
    for cookie in new_cookies {
        let cookie = cookie.as_ref();
        if cookie.is_empty() || cookie.len() > MAX_COOKIE_LEN {
            return Err(NtsError::BadCookie(cookie.len()));
        }
        let need = len + field_len(cookie.len());
        if need > req.request_len.min(room.len()) {
            return Err(NtsError::ReplyTooLarge {
                need: start + need,
                max: req.request_len,
            });
        }
        len += put_field(&mut room[..need], len, COOKIE, cookie)?;
    }
    let plain = &room[..len];
    let need = start + field_len(req.uid.len()) + authenticator_len(NONCE_LEN, plain.len());
    if need > req.request_len {
        return Err(NtsError::ReplyTooLarge {
            need,
            max: req.request_len,
        });
    }
    let mut at = start;
    at += put_field(out, at, UNIQUE_IDENTIFIER, &req.uid)?;
    at += put_authenticator(out, at, &req.keys.s2c, nonce, plain)?;
    Ok(at)
}

/// Writes an NTS NAK answering `request` into `out`: a Kiss-o'-Death
/// `NTSN` (see [`ntp::write_kiss`]: it reveals no time) followed by the
/// request's unique identifier, echoed, and nothing else. Returns its
/// length, never more than the request's. Fails if the request carries no
/// unique identifier: without one no client would believe the NAK.
pub fn write_nak(out: &mut [u8], request: &[u8]) -> Result<usize, NtsError> {
    let parsed = ntp::parse_request(request)?;
    let uid = parsed
        .fields
        .iter()
        .find(|f| f.kind == UNIQUE_IDENTIFIER)
        .ok_or(NtsError::MissingUid)?;
    let need = HEADER_LEN + field_len(uid.value.len());
    if out.len() < need {
        return Err(NtsError::BufferTooSmall {
            need,
            have: out.len(),
        });
    }
    ntp::write_kiss(parsed.header.echo(), RefId::NTSN, out);
    Ok(HEADER_LEN + put_field(out, HEADER_LEN, UNIQUE_IDENTIFIER, uid.value)?)
}

/// The client's check of a reply to the request that carried `uid`: it
/// must echo `uid` and carry an authenticator, last, that verifies under
/// `s2c`; returns the cookies in its encrypted part (those of 12 to
/// [`MAX_COOKIE_LEN`] bytes, at most [`MAX_COOKIES`]; possibly none).
/// An NTS NAK echoing `uid` is [`NtsError::Nak`]; any other reply without
/// an authenticator, a Kiss-o'-Death included, is
/// [`NtsError::Unauthenticated`]: after NTS-KE nothing unauthenticated is
/// believed but a NAK.
///
/// This checks authenticity only: then check the header as for any reply
/// ([`ntp::check_reply`]: origin, mode, stratum, leap).
pub fn check_reply(
    packet: &[u8],
    uid: &[u8; UID_LEN],
    s2c: &Key,
) -> Result<Vec<Vec<u8>>, NtsError> {
    let header = Header::read(packet).ok_or(PacketError::TooShort(packet.len()))?;
    if header.mode != Mode::Server {
        return Err(PacketError::Mode(header.mode as u8).into());
    }
    if header.version != ntp::VERSION {
        return Err(PacketError::Version(header.version).into());
    }
    let trailer = ntp::parse_trailer(&packet[HEADER_LEN..])?;
    if trailer.mac.is_some() {
        return Err(PacketError::Mac.into());
    }
    let mut echoed = false;
    let mut auth = None;
    let last = trailer.fields.len().saturating_sub(1);
    for (i, (offset, field)) in with_offsets(&trailer.fields).enumerate() {
        match field.kind {
            UNIQUE_IDENTIFIER => {
                if echoed {
                    return Err(NtsError::Duplicate(UNIQUE_IDENTIFIER));
                }
                if !constant_time_eq::constant_time_eq(field.value, uid) {
                    return Err(NtsError::UidMismatch);
                }
                echoed = true;
            }
            AUTHENTICATOR => {
                if i != last {
                    return Err(NtsError::AuthenticatorNotLast);
                }
                auth = Some((offset, field.value));
            }
            // Cookies in the clear would link our requests: ignored.
            _ => {}
        }
    }
    if !echoed {
        return Err(NtsError::MissingUid);
    }
    let Some((auth_offset, auth)) = auth else {
        return Err(
            if header.stratum == 0 && header.reference_id == RefId::NTSN {
                NtsError::Nak
            } else {
                NtsError::Unauthenticated
            },
        );
    };
    let (nonce, ciphertext) = parse_authenticator(auth)?;
    let plain = decrypt(s2c, nonce, &packet[..auth_offset], ciphertext)?;
    Ok(inner_fields(&plain)?
        .into_iter()
        .filter(|&(kind, value)| {
            kind == COOKIE && (ntp::MIN_EXTENSION_LEN - 4..=MAX_COOKIE_LEN).contains(&value.len())
        })
        .take(MAX_COOKIES)
        .map(|(_, value)| value.to_vec())
        .collect())
}

// ---------------------------------------------------------------- helpers

fn check_start(start: usize, len: usize) -> Result<(), NtsError> {
    if start < HEADER_LEN || start > len || !start.is_multiple_of(4) {
        return Err(NtsError::BadStart(start));
    }
    Ok(())
}

/// Each field with its offset in the packet: the header, then every
/// field's 4-byte type and length and its (padded) value.
fn with_offsets<'p, 'a>(
    fields: &'p [ntp::ExtensionField<'a>],
) -> impl Iterator<Item = (usize, &'p ntp::ExtensionField<'a>)> {
    fields.iter().scan(HEADER_LEN, |offset, field| {
        let at = *offset;
        *offset += 4 + field.value.len();
        Some((at, field))
    })
}

/// All cookie-sized slots (the cookie and its placeholders) must be as
/// long as the first.
fn same_length(slot: &mut Option<usize>, len: usize) -> Result<(), NtsError> {
    match *slot {
        Some(expected) if expected != len => Err(NtsError::PlaceholderLength {
            expected,
            found: len,
        }),
        _ => {
            *slot = Some(len);
            Ok(())
        }
    }
}

/// What [`ntp::write_field`] writes for a value of `len` bytes.
fn field_len(len: usize) -> usize {
    (4 + len).next_multiple_of(4).max(ntp::MIN_EXTENSION_LEN)
}

/// The authenticator field for a nonce of `nonce_len` and `plain_len`
/// bytes of plaintext, padded as RFC 8915 §5.6 requires.
fn authenticator_len(nonce_len: usize, plain_len: usize) -> usize {
    4 + 4
        + nonce_len.next_multiple_of(4).max(MIN_NONCE_AREA)
        + (TAG_LEN + plain_len).next_multiple_of(4)
}

fn too_small(need: usize, have: usize) -> NtsError {
    NtsError::BufferTooSmall { need, have }
}

fn put_field(out: &mut [u8], at: usize, kind: u16, value: &[u8]) -> Result<usize, NtsError> {
    let need = at + field_len(value.len());
    out.get_mut(at..)
        .and_then(|rest| ntp::write_field(rest, kind, value))
        .ok_or(too_small(need, out.len()))
}

/// A field whose value is `len` zero bytes (a placeholder).
fn put_blank(out: &mut [u8], at: usize, kind: u16, len: usize) -> Result<usize, NtsError> {
    let total = field_len(len);
    let have = out.len();
    let field = out
        .get_mut(at..at + total)
        .ok_or(too_small(at + total, have))?;
    let total16 = u16::try_from(total).map_err(|_| NtsError::BadCookie(len))?;
    field[..2].copy_from_slice(&kind.to_be_bytes());
    field[2..4].copy_from_slice(&total16.to_be_bytes());
    field[4..].fill(0);
    Ok(total)
}

/// Writes the authenticator at `at`, over `out[..at]`, encrypting
/// `plain`; returns the field's length.
fn put_authenticator(
    out: &mut [u8],
    at: usize,
    key: &Key,
    nonce: &[u8; NONCE_LEN],
    plain: &[u8],
) -> Result<usize, NtsError> {
    let total = authenticator_len(NONCE_LEN, plain.len());
    let have = out.len();
    let total16 = u16::try_from(total).map_err(|_| too_small(at + total, have))?;
    let ct_len = TAG_LEN + plain.len();
    let ct_len16 = u16::try_from(ct_len).map_err(|_| too_small(at + total, have))?;
    let (ad, rest) = out.split_at_mut(at.min(have));
    let field = rest.get_mut(..total).ok_or(too_small(at + total, have))?;
    field.fill(0);
    field[..2].copy_from_slice(&AUTHENTICATOR.to_be_bytes());
    field[2..4].copy_from_slice(&total16.to_be_bytes());
    field[4..6].copy_from_slice(&(NONCE_LEN as u16).to_be_bytes());
    field[6..8].copy_from_slice(&ct_len16.to_be_bytes());
    field[8..8 + NONCE_LEN].copy_from_slice(nonce);
    let ct_at = 8 + NONCE_LEN.next_multiple_of(4).max(MIN_NONCE_AREA);
    aead::seal(key, nonce, ad, plain, &mut field[ct_at..ct_at + ct_len])
        .map_err(|_| too_small(at + total, have))?;
    Ok(total)
}

/// The nonce and tag ‖ ciphertext of an authenticator field's value,
/// checked as chrony checks them: a non-empty nonce, a ciphertext at
/// least a tag long, both with their padding inside the field, and at
/// least 16 bytes of nonce area.
fn parse_authenticator(value: &[u8]) -> Result<(&[u8], &[u8]), NtsError> {
    let bad = NtsError::MalformedAuthenticator;
    let [n0, n1, c0, c1, ref rest @ ..] = *value else {
        return Err(bad("shorter than its length fields"));
    };
    let nonce_len = usize::from(u16::from_be_bytes([n0, n1]));
    let ct_len = usize::from(u16::from_be_bytes([c0, c1]));
    if nonce_len == 0 {
        return Err(bad("empty nonce"));
    }
    if ct_len < TAG_LEN {
        return Err(bad("ciphertext shorter than a tag"));
    }
    let ct_at = nonce_len.next_multiple_of(4);
    if ct_at.max(MIN_NONCE_AREA) + ct_len.next_multiple_of(4) > rest.len() {
        return Err(bad("nonce and ciphertext overrun the field"));
    }
    match (rest.get(..nonce_len), rest.get(ct_at..ct_at + ct_len)) {
        (Some(nonce), Some(ct)) => Ok((nonce, ct)),
        _ => Err(bad("nonce and ciphertext overrun the field")),
    }
}

fn decrypt(key: &Key, nonce: &[u8], ad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, NtsError> {
    let mut plain = vec![0u8; ciphertext.len().saturating_sub(TAG_LEN)];
    aead::open(key, nonce, ad, ciphertext, &mut plain).map_err(|_| NtsError::Authentication)?;
    Ok(plain)
}

/// The extension fields inside the encrypted part: type, length (at least
/// 4, a multiple of 4, covering the field) and value, back to back. No
/// 16-byte minimum here: RFC 7822's minimum keeps fields apart from a
/// legacy MAC, and no MAC hides inside a ciphertext.
fn inner_fields(mut plain: &[u8]) -> Result<Vec<(u16, &[u8])>, NtsError> {
    let mut fields = Vec::new();
    while let [t0, t1, l0, l1, ..] = *plain {
        let len = usize::from(u16::from_be_bytes([l0, l1]));
        if len < 4 || !len.is_multiple_of(4) || len > plain.len() {
            return Err(NtsError::MalformedPlaintext);
        }
        fields.push((u16::from_be_bytes([t0, t1]), &plain[4..len]));
        plain = &plain[len..];
    }
    if plain.is_empty() {
        Ok(fields)
    } else {
        Err(NtsError::MalformedPlaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nts::aead::Aead;
    use crate::nts::cookie::COOKIE_LEN;
    use ntp::NtpTimestamp;
    use proptest::prelude::*;

    const UID: [u8; UID_LEN] = [0x11; UID_LEN];
    const NONCE: [u8; NONCE_LEN] = [0x22; NONCE_LEN];

    fn session(c2s: u8, s2c: u8) -> CookieKeys {
        CookieKeys {
            aead: Aead::AesSivCmac256,
            c2s: Key::from_bytes([c2s; 32]),
            s2c: Key::from_bytes([s2c; 32]),
        }
    }

    fn master() -> MasterKeys {
        MasterKeys::new(9, Key::from_bytes([0x33; 32]))
    }

    /// A client request with `placeholders`, its header written by
    /// `ntp::write_request`, authenticated under `keys`.
    fn request(keys: &CookieKeys, uid: &[u8; UID_LEN], placeholders: usize) -> Vec<u8> {
        let cookie = master().seal(keys, &[5; 16]);
        let mut out = vec![0u8; 1200];
        let start = ntp::write_request(NtpTimestamp(0x0102_0304_0506_0708), 6, &mut out);
        let len = write_request(
            &mut out,
            start,
            uid,
            &cookie,
            placeholders,
            &keys.c2s,
            &NONCE,
        )
        .unwrap();
        out.truncate(len);
        out
    }

    /// The server's whole answer to `packet`: a reply with fresh cookies,
    /// or a NAK, or nothing.
    fn serve(packet: &[u8], master: &MasterKeys) -> Result<Vec<u8>, NtsError> {
        let mut out = vec![0u8; 1200];
        match open_request(packet, master) {
            Ok(req) => {
                let cookies: Vec<Vec<u8>> = (0..req.cookies_wanted)
                    .map(|i| master.seal(&req.keys, &[i as u8; 16]))
                    .collect();
                let parsed = ntp::parse_request(packet).unwrap();
                let state = ntp::ServerState {
                    leap: ntp::Leap::None,
                    stratum: 2,
                    precision: -20,
                    root_delay: crate::Nanos::ZERO,
                    root_dispersion: crate::Nanos::ZERO,
                    reference_id: RefId::LOCAL,
                    reference_time: crate::Timestamp::EPOCH,
                };
                let t = crate::Timestamp::from_nanos(1_800_000_000_000_000_000);
                let start = ntp::write_reply(parsed.header.echo(), &state, t, t, &mut out);
                let len = write_reply(&mut out, start, &req, &cookies, &[0x44; 16])?;
                out.truncate(len);
                Ok(out)
            }
            Err(e) if e.nak() => {
                let len = write_nak(&mut out, packet)?;
                out.truncate(len);
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }

    #[test]
    fn a_request_is_laid_out_as_chrony_lays_it_out() {
        let keys = session(1, 2);
        let pkt = request(&keys, &UID, 7);
        // 48 + UID (4 + 32) + 8 cookie-sized fields (4 + 104) + auth 40.
        assert_eq!(pkt.len(), 48 + 36 + 8 * 108 + 40);
        let t = ntp::parse_trailer(&pkt[HEADER_LEN..]).unwrap();
        let kinds: Vec<u16> = t.fields.iter().map(|f| f.kind).collect();
        let mut want = vec![UNIQUE_IDENTIFIER, COOKIE];
        want.extend([COOKIE_PLACEHOLDER; 7]);
        want.push(AUTHENTICATOR);
        assert_eq!(kinds, want);
        assert_eq!(t.fields[0].value, UID);
        assert!(t.fields[2..9].iter().all(|f| f.value == [0u8; COOKIE_LEN]));
        // nonce length 16, ciphertext length 16 (the tag of nothing), the
        // nonce, the tag: no padding needed anywhere.
        let auth = t.fields[9].value;
        assert_eq!(auth.len(), 36);
        assert_eq!(auth[..4], [0, 16, 0, 16]);
        assert_eq!(auth[4..20], NONCE);
        let mut tag = [0u8; TAG_LEN];
        aead::seal(&keys.c2s, &NONCE, &pkt[..pkt.len() - 40], &[], &mut tag).unwrap();
        assert_eq!(auth[20..], tag);
    }

    #[test]
    fn request_reply_round_trip() {
        let keys = session(1, 2);
        let pkt = request(&keys, &UID, 3);
        let req = open_request(&pkt, &master()).unwrap();
        assert_eq!(req.uid, UID);
        assert_eq!(req.keys, keys);
        assert_eq!(req.cookies_wanted, 4);
        assert_eq!(req.request_len, pkt.len());
        let reply = serve(&pkt, &master()).unwrap();
        // Cookies of the same size as the spent one and its placeholders:
        // the reply is exactly as long as the request.
        assert_eq!(reply.len(), pkt.len());
        let cookies = check_reply(&reply, &UID, &keys.s2c).unwrap();
        assert_eq!(cookies.len(), 4);
        for c in &cookies {
            assert_eq!(master().open(c), Ok(keys.clone()));
        }
        // And the header is an ordinary reply to our request.
        assert!(matches!(
            ntp::check_reply(&reply, NtpTimestamp(0x0102_0304_0506_0708)),
            Ok(ntp::Reply::Time { .. })
        ));
    }

    #[test]
    fn the_reply_is_laid_out_as_chrony_expects() {
        let keys = session(1, 2);
        let reply = serve(&request(&keys, &UID, 0), &master()).unwrap();
        let t = ntp::parse_trailer(&reply[HEADER_LEN..]).unwrap();
        assert_eq!(t.fields.len(), 2);
        assert_eq!(
            (t.fields[0].kind, t.fields[0].value),
            (UNIQUE_IDENTIFIER, &UID[..])
        );
        let auth = t.fields[1].value;
        assert_eq!(t.fields[1].kind, AUTHENTICATOR);
        // nonce 16; ciphertext = tag + one cookie field (4 + 104).
        assert_eq!(auth[..4], [0, 16, 0, 16 + 108]);
        assert_eq!(auth.len(), 4 + 16 + 16 + 108);
    }

    #[test]
    fn placeholders_may_be_encrypted_too() {
        // RFC 8915 lets the client put placeholders inside the
        // authenticator; they count the same.
        let keys = session(1, 2);
        let cookie = master().seal(&keys, &[5; 16]);
        let mut out = vec![0u8; 1200];
        let mut at = ntp::write_request(NtpTimestamp(1), 6, &mut out);
        at += put_field(&mut out, at, UNIQUE_IDENTIFIER, &UID).unwrap();
        at += put_field(&mut out, at, COOKIE, &cookie).unwrap();
        let mut plain = vec![0u8; 2 * 108];
        put_blank(&mut plain, 0, COOKIE_PLACEHOLDER, 104).unwrap();
        put_blank(&mut plain, 108, COOKIE_PLACEHOLDER, 104).unwrap();
        at += put_authenticator(&mut out, at, &keys.c2s, &NONCE, &plain).unwrap();
        let req = open_request(&out[..at], &master()).unwrap();
        assert_eq!(req.cookies_wanted, 3);
        // An encrypted placeholder of another length is refused.
        let mut at2 = at - authenticator_len(16, plain.len());
        let mut short = vec![0u8; 100];
        let n = put_blank(&mut short, 0, COOKIE_PLACEHOLDER, 96).unwrap();
        at2 += put_authenticator(&mut out, at2, &keys.c2s, &NONCE, &short[..n]).unwrap();
        assert_eq!(
            open_request(&out[..at2], &master()),
            Err(NtsError::PlaceholderLength {
                expected: 104,
                found: 96
            })
        );
    }

    #[test]
    fn a_cookie_that_does_not_open_gets_a_nak() {
        let keys = session(1, 2);
        let pkt = request(&keys, &UID, 2);
        let stranger = MasterKeys::new(9, Key::from_bytes([0x34; 32]));
        let err = open_request(&pkt, &stranger).unwrap_err();
        assert_eq!(err, NtsError::Cookie(CookieError::Tag));
        assert!(err.nak());
        let rotated_away = MasterKeys::new(10, Key::from_bytes([0x33; 32]));
        assert_eq!(
            open_request(&pkt, &rotated_away),
            Err(NtsError::Cookie(CookieError::UnknownKey(9)))
        );
        let nak = serve(&pkt, &stranger).unwrap();
        // Header and echoed identifier, nothing else.
        assert_eq!(nak.len(), HEADER_LEN + 4 + UID_LEN);
        assert!(nak.len() < pkt.len());
        let h = Header::read(&nak).unwrap();
        assert_eq!(
            (h.stratum, h.reference_id, h.mode),
            (0, RefId::NTSN, Mode::Server)
        );
        assert_eq!(check_reply(&nak, &UID, &keys.s2c), Err(NtsError::Nak));
        assert_eq!(
            ntp::check_reply(&nak, NtpTimestamp(0x0102_0304_0506_0708)),
            Ok(ntp::Reply::Kiss(ntp::Kiss::NtsNak))
        );
        // A NAK for someone else's request means nothing to us.
        assert_eq!(
            check_reply(&nak, &[0x12; UID_LEN], &keys.s2c),
            Err(NtsError::UidMismatch)
        );
    }

    #[test]
    fn a_failed_authenticator_gets_a_nak_and_malformed_requests_nothing() {
        let keys = session(1, 2);
        // Authenticated under another c2s key than the cookie holds.
        let cookie = master().seal(&keys, &[5; 16]);
        let mut out = vec![0u8; 600];
        let start = ntp::write_request(NtpTimestamp(1), 6, &mut out);
        let len = write_request(
            &mut out,
            start,
            &UID,
            &cookie,
            0,
            &Key::from_bytes([9; 32]),
            &NONCE,
        )
        .unwrap();
        let err = open_request(&out[..len], &master()).unwrap_err();
        assert_eq!(err, NtsError::Authentication);
        assert!(err.nak());

        let pkt = request(&keys, &UID, 1);
        let t = ntp::parse_trailer(&pkt[HEADER_LEN..]).unwrap();
        let (uid_f, cookie_f, ph_f, auth_f) = (t.fields[0], t.fields[1], t.fields[2], t.fields[3]);
        let build = |fields: &[(u16, &[u8])]| {
            let mut p = pkt[..HEADER_LEN].to_vec();
            for (kind, value) in fields {
                let mut buf = vec![0u8; value.len() + 16];
                let n = ntp::write_field(&mut buf, *kind, value).unwrap();
                p.extend_from_slice(&buf[..n]);
            }
            p
        };
        let u = (UNIQUE_IDENTIFIER, uid_f.value);
        let c = (COOKIE, cookie_f.value);
        let ph = (COOKIE_PLACEHOLDER, ph_f.value);
        let a = (AUTHENTICATOR, auth_f.value);
        let other = (0x7777u16, &[0u8; 12][..]);
        let short_ph = (COOKIE_PLACEHOLDER, &[0u8; 100][..]);
        let short_uid = (UNIQUE_IDENTIFIER, &[0u8; 28][..]);
        let cases: Vec<(&str, Vec<u8>, NtsError)> = vec![
            ("no uid", build(&[c, ph, a]), NtsError::MissingUid),
            ("no cookie", build(&[u, ph, a]), NtsError::MissingCookie),
            (
                "no authenticator",
                build(&[u, c, ph]),
                NtsError::MissingAuthenticator,
            ),
            (
                "two uids",
                build(&[u, u, c, a]),
                NtsError::Duplicate(UNIQUE_IDENTIFIER),
            ),
            (
                "two cookies",
                build(&[u, c, c, a]),
                NtsError::Duplicate(COOKIE),
            ),
            (
                "short uid",
                build(&[short_uid, c, a]),
                NtsError::ShortUid(28),
            ),
            (
                "short placeholder",
                build(&[u, c, short_ph, a]),
                NtsError::PlaceholderLength {
                    expected: 104,
                    found: 100,
                },
            ),
            (
                "placeholder before the cookie",
                build(&[u, short_ph, c, a]),
                NtsError::PlaceholderLength {
                    expected: 100,
                    found: 104,
                },
            ),
            (
                "authenticator not last",
                build(&[u, c, a, other]),
                NtsError::AuthenticatorNotLast,
            ),
            (
                "authenticator of nothing",
                build(&[u, c, (AUTHENTICATOR, &[0u8; 12][..])]),
                NtsError::MalformedAuthenticator("empty nonce"),
            ),
        ];
        for (name, pkt, want) in cases {
            let got = open_request(&pkt, &master());
            assert_eq!(got, Err(want.clone()), "{name}");
            assert!(!want.nak(), "{name}");
            assert!(serve(&pkt, &master()).is_err(), "{name}: no answer");
        }
        // A field the server does not know, before the authenticator, is
        // fine (and authenticated).
        let mut ok = vec![0u8; 1200];
        let mut at = ntp::write_request(NtpTimestamp(1), 6, &mut ok);
        at += put_field(&mut ok, at, 0x7777, &[1; 12]).unwrap();
        let len = write_request(&mut ok, at, &UID, &cookie, 0, &keys.c2s, &NONCE).unwrap();
        assert_eq!(
            open_request(&ok[..len], &master()).unwrap().cookies_wanted,
            1
        );
        // NTPv3 and server-mode packets are not NTS requests.
        let mut v3 = pkt.clone();
        v3[0] = (3 << 3) | 3;
        assert_eq!(
            open_request(&v3, &master()),
            Err(NtsError::Packet(PacketError::Version(3)))
        );
        let mut mode4 = pkt.clone();
        mode4[0] = (4 << 3) | 4;
        assert_eq!(
            open_request(&mode4, &master()),
            Err(NtsError::Packet(PacketError::Mode(4)))
        );
        assert_eq!(
            open_request(&pkt[..40], &master()),
            Err(NtsError::Packet(PacketError::TooShort(40)))
        );
    }

    #[test]
    fn authenticator_lengths_are_checked_like_chronys() {
        let ok = |nonce_len: usize, ct_len: usize, body: usize| {
            let mut v = vec![0u8; 4 + body];
            v[..2].copy_from_slice(&(nonce_len as u16).to_be_bytes());
            v[2..4].copy_from_slice(&(ct_len as u16).to_be_bytes());
            parse_authenticator(&v).map(|(n, c)| (n.len(), c.len()))
        };
        assert_eq!(ok(16, 16, 32), Ok((16, 16)));
        // A 12-byte nonce needs 4 bytes of additional padding.
        assert_eq!(ok(12, 16, 32), Ok((12, 16)));
        assert!(ok(12, 16, 28).is_err());
        // A 5-byte nonce pads to 8, plus 8 of additional padding.
        assert_eq!(ok(5, 17, 36), Ok((5, 17)));
        assert!(ok(5, 17, 35).is_err());
        // Long nonces and extra padding are fine.
        assert_eq!(ok(24, 16, 60), Ok((24, 16)));
        assert!(ok(24, 16, 39).is_err());
        assert!(ok(0, 16, 32).is_err());
        assert!(ok(16, 15, 32).is_err());
        assert!(ok(16, 17, 32).is_err());
        assert!(ok(65535, 65535, 100).is_err());
        assert!(parse_authenticator(&[0, 16, 0]).is_err());
    }

    #[test]
    fn replies_are_checked_for_the_uid_and_the_authenticator() {
        let keys = session(1, 2);
        let reply = serve(&request(&keys, &UID, 1), &master()).unwrap();
        // The wrong key.
        assert_eq!(
            check_reply(&reply, &UID, &Key::from_bytes([3; 32])),
            Err(NtsError::Authentication)
        );
        // Replayed to answer another request: the identifier differs.
        assert_eq!(
            check_reply(&reply, &[0x12; UID_LEN], &keys.s2c),
            Err(NtsError::UidMismatch)
        );
        // And rewriting the identifier breaks the authenticator.
        let mut rewritten = reply.clone();
        rewritten[HEADER_LEN + 4..HEADER_LEN + 4 + UID_LEN].copy_from_slice(&[0x12; UID_LEN]);
        assert_eq!(
            check_reply(&rewritten, &[0x12; UID_LEN], &keys.s2c),
            Err(NtsError::Authentication)
        );
        // A plain reply, or a plain KoD, is unauthenticated.
        let mut plain = reply[..HEADER_LEN].to_vec();
        assert_eq!(
            check_reply(&plain, &UID, &keys.s2c),
            Err(NtsError::MissingUid)
        );
        let mut buf = [0u8; 40];
        let n = ntp::write_field(&mut buf, UNIQUE_IDENTIFIER, &UID).unwrap();
        plain.extend_from_slice(&buf[..n]);
        assert_eq!(
            check_reply(&plain, &UID, &keys.s2c),
            Err(NtsError::Unauthenticated)
        );
        let mut rate = plain.clone();
        rate[1] = 0;
        rate[12..16].copy_from_slice(b"RATE");
        assert_eq!(
            check_reply(&rate, &UID, &keys.s2c),
            Err(NtsError::Unauthenticated)
        );
        // A request is not a reply.
        assert_eq!(
            check_reply(&request(&keys, &UID, 0), &UID, &keys.s2c),
            Err(NtsError::Packet(PacketError::Mode(3)))
        );
    }

    #[test]
    fn odd_cookies_in_a_reply_are_skipped() {
        // Encrypted fields other than cookies, and cookies too short or
        // long to be any server's, are skipped; more than eight dropped.
        let keys = session(1, 2);
        let mut out = vec![0u8; 2000];
        let mut h = Header::read(&serve(&request(&keys, &UID, 0), &master()).unwrap()).unwrap();
        h.mode = Mode::Server;
        h.write(&mut out);
        let mut at = HEADER_LEN;
        at += put_field(&mut out, at, UNIQUE_IDENTIFIER, &UID).unwrap();
        let mut plain = vec![0u8; 1600];
        let mut p = 0;
        p += put_field(&mut plain, p, 0x7777, &[1; 20]).unwrap();
        p += put_field(&mut plain, p, COOKIE, &[2; 300]).unwrap();
        plain[p..p + 8].copy_from_slice(&[0x02, 0x04, 0, 8, 3, 3, 3, 3]); // 4-byte cookie
        p += 8;
        for i in 0..9 {
            p += put_field(&mut plain, p, COOKIE, &[10 + i; 100]).unwrap();
        }
        at += put_authenticator(&mut out, at, &keys.s2c, &NONCE, &plain[..p]).unwrap();
        let cookies = check_reply(&out[..at], &UID, &keys.s2c).unwrap();
        let firsts: Vec<u8> = cookies.iter().map(|c| c[0]).collect();
        assert_eq!(firsts, (10..18).collect::<Vec<u8>>());
        // Garbage inside the ciphertext is malformed.
        let mut at = HEADER_LEN + 36;
        at += put_authenticator(&mut out, at, &keys.s2c, &NONCE, &[0, 1, 0, 3]).unwrap();
        assert_eq!(
            check_reply(&out[..at], &UID, &keys.s2c),
            Err(NtsError::MalformedPlaintext)
        );
        // An authenticated reply with no cookie is still authentic.
        let mut at = HEADER_LEN + 36;
        at += put_authenticator(&mut out, at, &keys.s2c, &NONCE, &[]).unwrap();
        assert_eq!(check_reply(&out[..at], &UID, &keys.s2c), Ok(vec![]));
    }

    #[test]
    fn writers_refuse_what_does_not_fit() {
        let keys = session(1, 2);
        let cookie = vec![7u8; 104];
        let mut out = vec![0u8; 300];
        let w = |out: &mut [u8], start, cookie: &[u8], ph| {
            write_request(out, start, &UID, cookie, ph, &keys.c2s, &NONCE)
        };
        assert_eq!(w(&mut out, 47, &cookie, 0), Err(NtsError::BadStart(47)));
        assert_eq!(w(&mut out, 50, &cookie, 0), Err(NtsError::BadStart(50)));
        assert_eq!(w(&mut out, 304, &cookie, 0), Err(NtsError::BadStart(304)));
        assert_eq!(
            w(&mut out, 48, &cookie, 8),
            Err(NtsError::TooManyPlaceholders(8))
        );
        assert_eq!(w(&mut out, 48, &[], 0), Err(NtsError::BadCookie(0)));
        assert_eq!(w(&mut out, 48, &[0; 257], 0), Err(NtsError::BadCookie(257)));
        assert!(matches!(
            w(&mut out, 48, &cookie, 1),
            Err(NtsError::BufferTooSmall { .. })
        ));
        assert_eq!(w(&mut out, 48, &cookie, 0), Ok(48 + 36 + 108 + 40));

        // A reply with more cookies than the request paid for.
        let pkt = request(&keys, &UID, 1);
        let req = open_request(&pkt, &master()).unwrap();
        let three: Vec<Vec<u8>> = (0..3).map(|_| master().seal(&keys, &[1; 16])).collect();
        let mut out = vec![0u8; 2000];
        assert_eq!(
            write_reply(&mut out, 48, &req, &three, &NONCE),
            Err(NtsError::ReplyTooLarge {
                need: pkt.len() + 108,
                max: pkt.len()
            })
        );
        assert_eq!(
            write_reply(&mut out, 48, &req, &three[..2], &NONCE),
            Ok(pkt.len())
        );
        assert!(matches!(
            write_reply(&mut out[..200], 48, &req, &three[..2], &NONCE),
            Err(NtsError::BufferTooSmall { .. })
        ));
        assert_eq!(
            write_reply(&mut out, 48, &req, &[vec![]], &NONCE),
            Err(NtsError::BadCookie(0))
        );
        // A NAK needs room and a unique identifier to echo.
        assert!(matches!(
            write_nak(&mut out[..60], &pkt),
            Err(NtsError::BufferTooSmall { .. })
        ));
        assert_eq!(
            write_nak(&mut out, &pkt[..HEADER_LEN]),
            Err(NtsError::MissingUid)
        );
    }

    proptest! {
        #[test]
        fn round_trip_with_random_keys_and_reply_never_larger(
            c2s in any::<[u8; 32]>(), s2c in any::<[u8; 32]>(), uid in any::<[u8; 32]>(),
            master_key in any::<[u8; 32]>(), placeholders in 0usize..MAX_COOKIES,
        ) {
            let keys = CookieKeys { aead: Aead::AesSivCmac256, c2s: Key::from_bytes(c2s), s2c: Key::from_bytes(s2c) };
            let master = MasterKeys::new(1, Key::from_bytes(master_key));
            let cookie = master.seal(&keys, &[0; 16]);
            let mut out = vec![0u8; 1200];
            let start = ntp::write_request(NtpTimestamp(77), 6, &mut out);
            let len = write_request(&mut out, start, &uid, &cookie, placeholders, &keys.c2s, &NONCE).unwrap();
            let pkt = &out[..len];
            let reply = serve(pkt, &master).unwrap();
            prop_assert!(reply.len() <= pkt.len());
            let cookies = check_reply(&reply, &uid, &keys.s2c).unwrap();
            prop_assert_eq!(cookies.len(), placeholders + 1);
            for c in &cookies {
                prop_assert_eq!(master.open(c), Ok(keys.clone()));
            }
        }

        #[test]
        fn any_altered_request_bit_fails(i in any::<prop::sample::Index>(), bit in 0u8..8, ph in 0usize..3) {
            let keys = session(1, 2);
            let mut pkt = request(&keys, &UID, ph);
            let i = i.index(pkt.len());
            pkt[i] ^= 1 << bit;
            prop_assert!(open_request(&pkt, &master()).is_err(), "byte {}", i);
        }

        #[test]
        fn any_altered_reply_bit_fails(i in any::<prop::sample::Index>(), bit in 0u8..8, ph in 0usize..3) {
            let keys = session(1, 2);
            let mut reply = serve(&request(&keys, &UID, ph), &master()).unwrap();
            let i = i.index(reply.len());
            reply[i] ^= 1 << bit;
            prop_assert!(check_reply(&reply, &UID, &keys.s2c).is_err(), "byte {}", i);
        }

        #[test]
        fn no_datagram_panics_either_side(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let keys = session(1, 2);
            let _ = serve(&bytes, &master());
            let _ = check_reply(&bytes, &UID, &keys.s2c);
            let mut out = [0u8; 1200];
            let _ = write_nak(&mut out, &bytes);
        }

        #[test]
        fn mangled_requests_never_panic(
            keep in any::<prop::sample::Index>(),
            junk in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            // A genuine prefix with junk after it reaches the deeper checks.
            let pkt = request(&session(1, 2), &UID, 2);
            let cut = keep.index(pkt.len());
            let bytes = [&pkt[..cut], &junk[..]].concat();
            let _ = serve(&bytes, &master());
            let _ = check_reply(&bytes, &UID, &session(1, 2).s2c);
        }
    }
}
