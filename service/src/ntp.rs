//! The NTP packet format (RFC 5905, extension fields per RFC 7822): a pure
//! codec, no I/O, beside [`crate::wire`] (cerv's own datagram format).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |LI | VN  |Mode |    Stratum    |     Poll      |   Precision   |
//! |                          Root Delay (16.16 s)                 |
//! |                       Root Dispersion (16.16 s)               |
//! |                          Reference ID                         |
//! |                     Reference Timestamp (64)                  |
//! |                      Origin Timestamp (64)                    |
//! |                      Receive Timestamp (64)                   |
//! |                      Transmit Timestamp (64)                  |
//! |           Extension fields (type 16, length 16, value)...     |
//! |           [legacy MAC: key id 32, digest 128 or 160]          |
//! ```
//!
//! Timestamps are 32.32 fixed point seconds since 1900. The 32-bit seconds
//! wrap every 136 years (era 0 ends on 2036-02-07), so a timestamp names a
//! time only together with a rough idea of when it is: [`NtpTimestamp::to_timestamp`]
//! takes the era that puts it nearest a pivot (the local clock). Short
//! values (root delay, root dispersion) are 16.16 fixed point seconds,
//! always rounded **up** when converted either way, since they widen error
//! bounds and an honest bound errs wide.
//!
//! The server side ([`parse_request`], [`write_reply`], [`write_kiss`]) and the
//! client side ([`write_request`], [`check_reply`]) each validate what
//! they read and return typed reasons for what they refuse, so every drop
//! can be counted by cause.

use crate::time::{Nanos, Timestamp};
use std::fmt;

/// The fixed header, and the smallest valid packet.
pub const HEADER_LEN: usize = 48;
/// The NTP version this crate sends.
pub const VERSION: u8 = 4;
/// The smallest extension field (RFC 7822): type, length and at least 12
/// bytes of value.
pub const MIN_EXTENSION_LEN: usize = 16;
/// Seconds from 1900-01-01 (NTP's epoch) to 1970-01-01 (Unix's).
const UNIX_OFFSET_SECS: i128 = 2_208_988_800;
const NANOS_PER_SEC: i128 = 1_000_000_000;
/// Stratum 16 and above mean "unsynchronised".
pub const MAX_STRATUM: u8 = 16;

/// A 64-bit NTP timestamp: era-relative seconds since 1900 in the high 32
/// bits, the fraction of a second in the low 32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NtpTimestamp(pub u64);

impl NtpTimestamp {
    /// All zeros: "unknown" in every timestamp field.
    pub const ZERO: NtpTimestamp = NtpTimestamp(0);

    /// True for the all-zero value.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The NTP form of `t`, rounded to the nearest 2^-32 s (about 0.23 ns).
    ///
    /// In 64-bit arithmetic with constant divisors, which the compiler
    /// turns into multiplications: a server writes three of these in every
    /// reply, and 128-bit division is a library call an order of magnitude
    /// slower.
    pub fn from_timestamp(t: Timestamp) -> NtpTimestamp {
        const NANOS: i64 = NANOS_PER_SEC as i64;
        let nanos = t.as_nanos();
        let secs = nanos.div_euclid(NANOS) + UNIX_OFFSET_SECS as i64;
        // 0 ≤ sub < 10^9 < 2^30, so sub·2^32 fits in 64 bits.
        let sub = nanos.rem_euclid(NANOS) as u64;
        let frac = ((sub << 32) + NANOS as u64 / 2) / NANOS as u64;
        // A fraction that rounds up to a whole second carries into the
        // seconds; the era wraps modulo 2^32 seconds (the shift drops the
        // higher bits of the seconds).
        NtpTimestamp(((secs as u64) << 32).wrapping_add(frac))
    }

    /// The time this timestamp names in the era nearest `pivot` (within
    /// 68 years either side).
    pub fn to_timestamp(self, pivot: Timestamp) -> Timestamp {
        let pivot_secs =
            (i128::from(pivot.as_nanos())).div_euclid(NANOS_PER_SEC) + UNIX_OFFSET_SECS;
        let secs = i128::from((self.0 >> 32) as u32);
        // The difference of the 32-bit second counts, wrapped to ±2^31.
        let mut diff = secs - pivot_secs.rem_euclid(1 << 32);
        if diff >= 1 << 31 {
            diff -= 1 << 32;
        } else if diff < -(1 << 31) {
            diff += 1 << 32;
        }
        let full_secs = pivot_secs + diff - UNIX_OFFSET_SECS;
        let frac = i128::from(self.0 as u32);
        let sub = (frac * NANOS_PER_SEC + (1 << 31)) >> 32;
        let nanos = full_secs * NANOS_PER_SEC + sub;
        Timestamp::from_nanos(nanos.clamp(i64::MIN.into(), i64::MAX.into()) as i64)
    }

    fn read(bytes: &[u8]) -> NtpTimestamp {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[..8]);
        NtpTimestamp(u64::from_be_bytes(b))
    }
}

/// A 16.16 fixed point count of seconds (root delay, root dispersion).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NtpShort(pub u32);

impl NtpShort {
    /// The span, rounded up to the nanosecond.
    pub fn to_nanos(self) -> Nanos {
        let n = (u64::from(self.0) * 1_000_000_000).div_ceil(1 << 16);
        Nanos::from_nanos(n as i64)
    }

    /// The 16.16 form of `n`, rounded up; negative spans are zero and
    /// spans beyond 65536 s saturate.
    pub fn from_nanos(n: Nanos) -> NtpShort {
        // 65536 s and more saturate; below that n·2^16 fits in 64 bits.
        const LIMIT: u64 = 65_536 * 1_000_000_000;
        let n = n.as_nanos().max(0) as u64;
        if n >= LIMIT {
            return NtpShort(u32::MAX);
        }
        let v = (n << 16).div_ceil(1_000_000_000);
        NtpShort(v.min(u64::from(u32::MAX)) as u32)
    }
}

/// The leap indicator: a pending leap second, or "unsynchronised".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Leap {
    /// No leap second pending.
    #[default]
    None,
    /// The last minute of the day has 61 seconds.
    AddSecond,
    /// The last minute of the day has 59 seconds.
    DeleteSecond,
    /// The clock is not synchronised (also used by Kiss-o'-Death packets).
    Unsynchronized,
}

impl Leap {
    fn from_bits(bits: u8) -> Leap {
        match bits & 3 {
            0 => Leap::None,
            1 => Leap::AddSecond,
            2 => Leap::DeleteSecond,
            _ => Leap::Unsynchronized,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Leap::None => 0,
            Leap::AddSecond => 1,
            Leap::DeleteSecond => 2,
            Leap::Unsynchronized => 3,
        }
    }

    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Leap::None => "none",
            Leap::AddSecond => "add_second",
            Leap::DeleteSecond => "delete_second",
            Leap::Unsynchronized => "unsynchronized",
        }
    }
}

/// The association mode of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// 0: reserved.
    Reserved,
    /// 1: symmetric active.
    SymmetricActive,
    /// 2: symmetric passive.
    SymmetricPassive,
    /// 3: a client's request.
    Client,
    /// 4: a server's reply.
    Server,
    /// 5: broadcast.
    Broadcast,
    /// 6: control messages (ntpq).
    Control,
    /// 7: private (ntpdc, the monlist amplifier).
    Private,
}

impl Mode {
    fn from_bits(bits: u8) -> Mode {
        match bits & 7 {
            0 => Mode::Reserved,
            1 => Mode::SymmetricActive,
            2 => Mode::SymmetricPassive,
            3 => Mode::Client,
            4 => Mode::Server,
            5 => Mode::Broadcast,
            6 => Mode::Control,
            _ => Mode::Private,
        }
    }

    fn bits(self) -> u8 {
        self as u8
    }
}

/// A reference identifier: four ASCII letters for stratum 0 (a kiss code)
/// and 1 (the kind of reference clock), an IPv4 address (or the first
/// bytes of a hash of an IPv6 one) above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RefId(pub [u8; 4]);

impl RefId {
    /// chrony's and ntpd's identifier of a local, undisciplined reference:
    /// 127.127.1.1 ("LOCL" in chrony's reports).
    pub const LOCAL: RefId = RefId([127, 127, 1, 1]);
    /// Kiss-o'-Death: slow down.
    pub const RATE: RefId = RefId(*b"RATE");
    /// Kiss-o'-Death: access denied.
    pub const DENY: RefId = RefId(*b"DENY");
    /// Kiss-o'-Death: access restricted.
    pub const RSTR: RefId = RefId(*b"RSTR");
    /// Kiss-o'-Death (NTS, RFC 8915): the cookie could not be opened.
    pub const NTSN: RefId = RefId(*b"NTSN");

    /// As text: letters for the ASCII forms a server at `stratum` uses,
    /// a dotted quad otherwise.
    pub fn display(self, stratum: u8) -> String {
        let printable = self.0.iter().all(|&b| b == 0 || b.is_ascii_graphic());
        if stratum <= 1 && printable {
            self.0
                .iter()
                .take_while(|&&b| b != 0)
                .map(|&b| b as char)
                .collect()
        } else {
            let [a, b, c, d] = self.0;
            format!("{a}.{b}.{c}.{d}")
        }
    }
}

/// The 48-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Leap indicator.
    pub leap: Leap,
    /// Protocol version (1 to 7 on the wire; 3 and 4 are in use).
    pub version: u8,
    /// Association mode.
    pub mode: Mode,
    /// Distance from a reference clock in hops; 0 is unspecified (or a
    /// kiss code), 16 and above unsynchronised.
    pub stratum: u8,
    /// log2 of the poll interval in seconds.
    pub poll: i8,
    /// log2 of the clock's precision in seconds.
    pub precision: i8,
    /// Round trip to the reference clock.
    pub root_delay: NtpShort,
    /// Dispersion (error) accumulated up to the reference clock.
    pub root_dispersion: NtpShort,
    /// Who the reference is, or a kiss code.
    pub reference_id: RefId,
    /// When the server's clock was last set or corrected.
    pub reference: NtpTimestamp,
    /// In a reply: the transmit timestamp of the request it answers.
    pub origin: NtpTimestamp,
    /// In a reply: when the request arrived (ts2).
    pub receive: NtpTimestamp,
    /// When the packet left (ts3 in a reply; a client's own, or random
    /// bits, in a request).
    pub transmit: NtpTimestamp,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            leap: Leap::None,
            version: VERSION,
            mode: Mode::Client,
            stratum: 0,
            poll: 0,
            precision: 0,
            root_delay: NtpShort(0),
            root_dispersion: NtpShort(0),
            reference_id: RefId([0; 4]),
            reference: NtpTimestamp::ZERO,
            origin: NtpTimestamp::ZERO,
            receive: NtpTimestamp::ZERO,
            transmit: NtpTimestamp::ZERO,
        }
    }
}

impl Header {
    /// Reads the header from the first [`HEADER_LEN`] bytes, or `None` if
    /// there are fewer.
    pub fn read(bytes: &[u8]) -> Option<Header> {
        let b = bytes.get(..HEADER_LEN)?;
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Header {
            leap: Leap::from_bits(b[0] >> 6),
            version: (b[0] >> 3) & 7,
            mode: Mode::from_bits(b[0]),
            stratum: b[1],
            poll: b[2] as i8,
            precision: b[3] as i8,
            root_delay: NtpShort(word(4)),
            root_dispersion: NtpShort(word(8)),
            reference_id: RefId([b[12], b[13], b[14], b[15]]),
            reference: NtpTimestamp::read(&b[16..]),
            origin: NtpTimestamp::read(&b[24..]),
            receive: NtpTimestamp::read(&b[32..]),
            transmit: NtpTimestamp::read(&b[40..]),
        })
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`
    /// (which must be at least that long).
    pub fn write(&self, out: &mut [u8]) {
        let b = &mut out[..HEADER_LEN];
        b[0] = (self.leap.bits() << 6) | ((self.version & 7) << 3) | self.mode.bits();
        b[1] = self.stratum;
        b[2] = self.poll as u8;
        b[3] = self.precision as u8;
        b[4..8].copy_from_slice(&self.root_delay.0.to_be_bytes());
        b[8..12].copy_from_slice(&self.root_dispersion.0.to_be_bytes());
        b[12..16].copy_from_slice(&self.reference_id.0);
        b[16..24].copy_from_slice(&self.reference.0.to_be_bytes());
        b[24..32].copy_from_slice(&self.origin.0.to_be_bytes());
        b[32..40].copy_from_slice(&self.receive.0.to_be_bytes());
        b[40..48].copy_from_slice(&self.transmit.0.to_be_bytes());
    }
}

/// One extension field (RFC 7822): a 16-bit type and its value (padding
/// included; the length on the wire covers the 4-byte field header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtensionField<'a> {
    /// The field type.
    pub kind: u16,
    /// The value, padding included.
    pub value: &'a [u8],
}

/// What follows the header, split into extension fields and a legacy
/// MAC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trailer<'a> {
    /// The extension fields, in order.
    pub fields: Vec<ExtensionField<'a>>,
    /// A legacy symmetric-key MAC (key id and digest, 20 or 24 bytes) or a
    /// crypto-NAK (4 zero bytes), if present.
    pub mac: Option<&'a [u8]>,
}

/// Most extension fields a packet may carry; more is refused (a request
/// that needs more is not one any client sends).
pub const MAX_FIELDS: usize = 16;

/// Splits the bytes after the header into extension fields and a MAC, per
/// RFC 7822: fields of at least [`MIN_EXTENSION_LEN`] bytes, lengths a
/// multiple of 4, then optionally a MAC of 4, 20 or 24 bytes. Anything
/// else is malformed.
pub fn parse_trailer(mut rest: &[u8]) -> Result<Trailer<'_>, PacketError> {
    let mut trailer = Trailer::default();
    loop {
        if rest.is_empty() {
            return Ok(trailer);
        }
        if matches!(rest.len(), 4 | 20 | 24) {
            // RFC 7822 §7.5: the remainder is a MAC when it has a MAC's
            // length (a field of exactly that length would be ambiguous,
            // and no client sends one).
            trailer.mac = Some(rest);
            return Ok(trailer);
        }
        if rest.len() < MIN_EXTENSION_LEN {
            return Err(PacketError::Malformed("truncated extension field"));
        }
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if len < MIN_EXTENSION_LEN || len % 4 != 0 || len > rest.len() {
            return Err(PacketError::Malformed("bad extension field length"));
        }
        if trailer.fields.len() == MAX_FIELDS {
            return Err(PacketError::Malformed("too many extension fields"));
        }
        trailer.fields.push(ExtensionField {
            kind,
            value: &rest[4..len],
        });
        rest = &rest[len..];
    }
}

/// Appends an extension field of `kind` with `value`, zero-padded to a
/// multiple of 4 and to at least [`MIN_EXTENSION_LEN`]; returns the bytes
/// written, or `None` if `out` is too small or the field too long.
pub fn write_field(out: &mut [u8], kind: u16, value: &[u8]) -> Option<usize> {
    let len = (4 + value.len()).next_multiple_of(4).max(MIN_EXTENSION_LEN);
    let len16 = u16::try_from(len).ok()?;
    let field = out.get_mut(..len)?;
    field[..2].copy_from_slice(&kind.to_be_bytes());
    field[2..4].copy_from_slice(&len16.to_be_bytes());
    field[4..4 + value.len()].copy_from_slice(value);
    field[4 + value.len()..].fill(0);
    Some(len)
}

/// Why a packet was not accepted. Each reason is counted on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than the 48-byte header.
    #[error("shorter than an NTP header ({0} bytes)")]
    TooShort(usize),
    /// A control (6) or private (7) query: never answered (these are the
    /// modes of the monlist amplification attacks).
    #[error("mode {0} query (control and private modes are never answered)")]
    Control(u8),
    /// Another mode than the side expects.
    #[error("unexpected mode {0}")]
    Mode(u8),
    /// A version this side does not speak.
    #[error("unsupported NTP version {0}")]
    Version(u8),
    /// The bytes after the header are neither extension fields nor a MAC.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// A legacy symmetric-key MAC, which this server does not verify.
    #[error("carries a symmetric-key MAC (not supported)")]
    Mac,
}

/// A client request, as a server reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request's header.
    pub header: Header,
    /// Its extension fields (NTS lives there; unknown ones are ignored).
    pub fields: Vec<ExtensionField<'a>>,
    /// Its length on the wire: no reply may be longer.
    pub len: usize,
}

/// Reads a client request (mode 3, version 3 or 4). Unknown extension
/// fields are kept for the caller to ignore (RFC 7822); a legacy MAC is
/// refused, since this server holds no symmetric keys.
pub fn parse_request(bytes: &[u8]) -> Result<Request<'_>, PacketError> {
    let header = Header::read(bytes).ok_or(PacketError::TooShort(bytes.len()))?;
    check_client(header.mode, header.version)?;
    // Most requests are a bare header.
    let fields = if bytes.len() == HEADER_LEN {
        Vec::new()
    } else {
        let trailer = parse_trailer(&bytes[HEADER_LEN..])?;
        if trailer.mac.is_some() {
            return Err(PacketError::Mac);
        }
        trailer.fields
    };
    Ok(Request {
        header,
        fields,
        len: bytes.len(),
    })
}

/// Reads a request that is a bare header ([`HEADER_LEN`] bytes, as most
/// are), with the checks of [`parse_request`]: what a reply to it echoes
/// is all a server needs of it. Longer datagrams are for `parse_request`.
pub fn read_bare_request(bytes: &[u8]) -> Result<Echo, PacketError> {
    let b: &[u8; HEADER_LEN] = bytes
        .try_into()
        .map_err(|_| PacketError::TooShort(bytes.len()))?;
    let version = (b[0] >> 3) & 7;
    check_client(Mode::from_bits(b[0]), version)?;
    Ok(Echo {
        version,
        poll: b[2] as i8,
        transmit: NtpTimestamp::read(&b[40..]),
    })
}

/// What a server answers: client requests (mode 3), NTPv3 or v4.
fn check_client(mode: Mode, version: u8) -> Result<(), PacketError> {
    match mode {
        Mode::Client => {}
        Mode::Control | Mode::Private => return Err(PacketError::Control(mode.bits())),
        other => return Err(PacketError::Mode(other.bits())),
    }
    if !(3..=4).contains(&version) {
        return Err(PacketError::Version(version));
    }
    Ok(())
}

/// What a server says about its own clock in every reply: how good it is,
/// and from where it gets the time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerState {
    /// Leap indicator ([`Leap::Unsynchronized`] when the clock is not
    /// synchronised).
    pub leap: Leap,
    /// Stratum (16: unsynchronised).
    pub stratum: u8,
    /// log2 of the clock's precision in seconds.
    pub precision: i8,
    /// Round trip to the reference.
    pub root_delay: Nanos,
    /// Error accumulated up to the reference.
    pub root_dispersion: Nanos,
    /// Who the reference is.
    pub reference_id: RefId,
    /// When the clock was last set or checked.
    pub reference_time: Timestamp,
}

impl ServerState {
    /// The root distance, `root_delay / 2 + root_dispersion`: how far the
    /// server's clock may be from its reference. A client widens its
    /// bound by this to be honest to the reference, not just to the
    /// server.
    pub fn root_distance(&self) -> Nanos {
        Nanos::from_nanos((self.root_delay.as_nanos().max(0) as u64).div_ceil(2) as i64)
            .saturating_add(self.root_dispersion.max(Nanos::ZERO))
    }

    /// How far the server's clock readings may be from its reference: the
    /// root distance plus the clock's precision (a reading is uncertain
    /// by one tick). A client widens each sample's interval by this. The
    /// precision is counted apart because the 16.16 format of the root
    /// dispersion cannot carry less than 15 µs.
    pub fn uncertainty(&self) -> Nanos {
        self.root_distance()
            .saturating_add(precision_nanos(self.precision))
    }

    /// Whether a client should use this server's time at all.
    pub fn is_synchronized(&self) -> bool {
        self.leap != Leap::Unsynchronized && (1..MAX_STRATUM).contains(&self.stratum)
    }

    /// What a reply's header says.
    pub fn from_header(h: &Header) -> ServerState {
        ServerState {
            leap: h.leap,
            stratum: h.stratum,
            precision: h.precision,
            root_delay: h.root_delay.to_nanos(),
            root_dispersion: h.root_dispersion.to_nanos(),
            reference_id: h.reference_id,
            reference_time: Timestamp::EPOCH,
        }
    }
}

/// The stratum a server claims while the kernel reports its clock
/// synchronised and the operator has not said otherwise: cerv serves the
/// kernel's clock and cannot see the upstream of the daemon that
/// disciplines it, so it claims the common case, a server one hop from a
/// stratum-1 source.
pub const DEFAULT_SYNCED_STRATUM: u8 = 2;

impl ServerState {
    /// What a server on this machine says of its clock, from the kernel's
    /// view of it (see [`crate::clock::kernel_clock`]) and the operator's
    /// `local_stratum` (cerv's `--ntp-stratum`, chrony's `local stratum`):
    ///
    /// | kernel clock | `local_stratum` | leap | stratum | root dispersion | reference id |
    /// |---|---|---|---|---|---|
    /// | synchronised | none | the kernel's | 2 | the kernel's maximum error | 127.127.1.1 |
    /// | synchronised | N | the kernel's | N | the kernel's maximum error | 127.127.1.1 |
    /// | unsynchronised | none | 3 (unsynchronised) | 16 | the kernel's maximum error | 0 |
    /// | unsynchronised | N | none | N | 0 | 127.127.1.1 |
    ///
    /// The root delay is zero (the kernel's maximum error already covers
    /// the whole distance to the reference, as chrony and ntpd set it),
    /// and the reference time is a second before `now`. An unsynchronised
    /// clock is served only when the operator says so: clients (chrony,
    /// ntpd, fient) refuse leap 3 and stratum 16.
    pub fn serving(
        kernel: &crate::clock::KernelClock,
        local_stratum: Option<u8>,
        precision: i8,
        now: Timestamp,
    ) -> ServerState {
        let reference_time = now.saturating_add(Nanos::from_secs(-1));
        let base = ServerState {
            leap: kernel.leap,
            stratum: local_stratum.unwrap_or(DEFAULT_SYNCED_STRATUM),
            precision,
            root_delay: Nanos::ZERO,
            root_dispersion: kernel.max_error,
            reference_id: RefId::LOCAL,
            reference_time,
        };
        match (kernel.synchronized, local_stratum) {
            (true, _) => base,
            (false, Some(_)) => ServerState {
                leap: Leap::None,
                root_dispersion: Nanos::ZERO,
                ..base
            },
            (false, None) => ServerState {
                leap: Leap::Unsynchronized,
                stratum: MAX_STRATUM,
                reference_id: RefId([0; 4]),
                reference_time: Timestamp::EPOCH,
                ..base
            },
        }
    }
}

/// 2^precision seconds, rounded up to the nanosecond.
fn precision_nanos(precision: i8) -> Nanos {
    let p = i32::from(precision).clamp(-40, 30);
    if p >= 0 {
        Nanos::from_secs(1i64 << p)
    } else {
        Nanos::from_nanos((1_000_000_000u64.div_ceil(1u64 << (-p).min(62)) as i64).max(1))
    }
}

/// What a reply echoes of its request: its version and poll, and its
/// transmit timestamp as the reply's origin. A server keeps only this of
/// a request it has yet to answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo {
    /// The request's version (the reply speaks it back).
    pub version: u8,
    /// The request's poll exponent (copied).
    pub poll: i8,
    /// The request's transmit timestamp (the reply's origin).
    pub transmit: NtpTimestamp,
}

impl Header {
    /// What a reply to this request echoes.
    pub fn echo(&self) -> Echo {
        Echo {
            version: self.version,
            poll: self.poll,
            transmit: self.transmit,
        }
    }
}

/// A mode-4 reply with everything that does not depend on the request in
/// place: the server's state and the transmit timestamp. A server builds
/// one per batch of replies (one state, one ts3 read just before the
/// batch leaves) and stamps each request's own fields into a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTemplate {
    bytes: [u8; HEADER_LEN],
}

impl ReplyTemplate {
    /// The replies of a server in `state` whose transmit timestamp is
    /// `ts3`.
    pub fn new(state: &ServerState, ts3: Timestamp) -> ReplyTemplate {
        let mut bytes = [0u8; HEADER_LEN];
        Header {
            leap: state.leap,
            version: 0,
            mode: Mode::Server,
            stratum: state.stratum.min(MAX_STRATUM),
            poll: 0,
            precision: state.precision,
            root_delay: NtpShort::from_nanos(state.root_delay),
            root_dispersion: NtpShort::from_nanos(state.root_dispersion),
            reference_id: state.reference_id,
            reference: NtpTimestamp::from_timestamp(state.reference_time),
            origin: NtpTimestamp::ZERO,
            receive: NtpTimestamp::ZERO,
            transmit: NtpTimestamp::from_timestamp(ts3),
        }
        .write(&mut bytes);
        ReplyTemplate { bytes }
    }

    /// Writes the reply to `request`, which arrived at `ts2`, into `out`
    /// (at least [`HEADER_LEN`] bytes); returns the length.
    pub fn write(&self, request: Echo, ts2: Timestamp, out: &mut [u8]) -> usize {
        let b = &mut out[..HEADER_LEN];
        b.copy_from_slice(&self.bytes);
        b[0] |= (request.version & 7) << 3;
        b[2] = request.poll as u8;
        b[24..32].copy_from_slice(&request.transmit.0.to_be_bytes());
        b[32..40].copy_from_slice(&NtpTimestamp::from_timestamp(ts2).0.to_be_bytes());
        HEADER_LEN
    }
}

/// Writes a mode-4 reply to `request` into `out`: origin echoes the
/// request's transmit timestamp, receive is `ts2`, transmit `ts3`, poll is
/// copied, the version is the request's. Returns the length
/// ([`HEADER_LEN`]: a plain reply carries no extension fields, so it is
/// never larger than any valid request). A server answering many at once
/// builds the [`ReplyTemplate`] once instead.
pub fn write_reply(
    request: Echo,
    state: &ServerState,
    ts2: Timestamp,
    ts3: Timestamp,
    out: &mut [u8],
) -> usize {
    ReplyTemplate::new(state, ts3).write(request, ts2, out)
}

/// Writes a Kiss-o'-Death reply to `request` (stratum 0, leap 3, the code
/// in the reference id). Like ntpd, it reveals no time: every timestamp is
/// the request's own transmit timestamp, which a genuine client needs to
/// match it to its request. Returns the length ([`HEADER_LEN`]).
pub fn write_kiss(request: Echo, code: RefId, out: &mut [u8]) -> usize {
    let header = Header {
        leap: Leap::Unsynchronized,
        version: request.version,
        mode: Mode::Server,
        stratum: 0,
        poll: request.poll,
        precision: 0,
        root_delay: NtpShort(0),
        root_dispersion: NtpShort(0),
        reference_id: code,
        reference: NtpTimestamp::ZERO,
        origin: request.transmit,
        receive: request.transmit,
        transmit: request.transmit,
    };
    header.write(out);
    HEADER_LEN
}

/// Writes a client request whose transmit timestamp is `cookie` (random
/// bits a reply must echo as its origin; the true send time stays with
/// the client, RFC 9109 §3). Everything else about the client's clock is
/// left zero, as chrony does: a request reveals nothing. Returns the
/// length ([`HEADER_LEN`]).
pub fn write_request(cookie: NtpTimestamp, poll: i8, out: &mut [u8]) -> usize {
    let header = Header {
        poll,
        precision: 0x20,
        transmit: cookie,
        ..Header::default()
    };
    header.write(out);
    HEADER_LEN
}

/// A Kiss-o'-Death code a server sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kiss {
    /// RATE: ask less often.
    Rate,
    /// DENY: stop asking this server.
    Deny,
    /// RSTR: stop asking this server.
    Restricted,
    /// NTSN: an NTS cookie could not be opened (get fresh keys).
    NtsNak,
    /// Any other code (to be treated as "no answer").
    Other(RefId),
}

impl Kiss {
    fn from_refid(id: RefId) -> Kiss {
        match id {
            RefId::RATE => Kiss::Rate,
            RefId::DENY => Kiss::Deny,
            RefId::RSTR => Kiss::Restricted,
            RefId::NTSN => Kiss::NtsNak,
            other => Kiss::Other(other),
        }
    }

    /// The four letters.
    pub fn code(self) -> String {
        let id = match self {
            Kiss::Rate => RefId::RATE,
            Kiss::Deny => RefId::DENY,
            Kiss::Restricted => RefId::RSTR,
            Kiss::NtsNak => RefId::NTSN,
            Kiss::Other(id) => id,
        };
        id.display(0)
    }

    /// Whether the client must stop asking this server.
    pub fn stops(self) -> bool {
        matches!(self, Kiss::Deny | Kiss::Restricted)
    }
}

impl fmt::Display for Kiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Kiss::Rate => "the server asks us to poll less often",
            Kiss::Deny | Kiss::Restricted => "the server denies us access",
            Kiss::NtsNak => "the server could not open our NTS cookie",
            Kiss::Other(_) => "unknown code",
        };
        write!(f, "kiss-o'-death {} ({what})", self.code())
    }
}

/// A reply that answers our request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Time: ts2 and ts3 (to be placed in the era near the request's
    /// send time) and what the server says of its clock.
    Time {
        /// When the request arrived.
        receive: NtpTimestamp,
        /// When the reply left.
        transmit: NtpTimestamp,
        /// The server's account of its own clock.
        state: ServerState,
    },
    /// A Kiss-o'-Death.
    Kiss(Kiss),
}

/// Why a reply was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not a well-formed reply.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// The origin is not the cookie of a request we sent: a stale,
    /// duplicated or forged reply.
    #[error("reply to no request sent (origin mismatch)")]
    Unmatched,
    /// The server says its clock is not synchronised (leap 3 or stratum
    /// 16 and above).
    #[error("the server's clock is not synchronised (leap {leap}, stratum {stratum})")]
    Unsynchronized {
        /// Leap indicator bits.
        leap: u8,
        /// Stratum.
        stratum: u8,
    },
    /// A receive or transmit timestamp of zero.
    #[error("the reply's timestamps are missing (zero)")]
    ZeroTimestamp,
}

/// Checks a datagram that claims to answer the request whose transmit
/// timestamp was `cookie`. The origin is checked before anything else is
/// believed, a Kiss-o'-Death included: a KoD with the wrong origin is a
/// spoof (CVE-2015-7704) and changes nothing.
pub fn check_reply(bytes: &[u8], cookie: NtpTimestamp) -> Result<Reply, ReplyError> {
    let header = Header::read(bytes).ok_or(PacketError::TooShort(bytes.len()))?;
    if header.mode != Mode::Server {
        return Err(PacketError::Mode(header.mode.bits()).into());
    }
    if !(3..=4).contains(&header.version) {
        return Err(PacketError::Version(header.version).into());
    }
    parse_trailer(&bytes[HEADER_LEN..])?;
    if header.origin != cookie || cookie.is_zero() {
        return Err(ReplyError::Unmatched);
    }
    if header.stratum == 0 {
        return Ok(Reply::Kiss(Kiss::from_refid(header.reference_id)));
    }
    if header.leap == Leap::Unsynchronized || header.stratum >= MAX_STRATUM {
        return Err(ReplyError::Unsynchronized {
            leap: header.leap.bits(),
            stratum: header.stratum,
        });
    }
    if header.receive.is_zero() || header.transmit.is_zero() {
        return Err(ReplyError::ZeroTimestamp);
    }
    let mut state = ServerState::from_header(&header);
    state.reference_time = header.reference.to_timestamp(Timestamp::EPOCH);
    Ok(Reply::Time {
        receive: header.receive,
        transmit: header.transmit,
        state,
    })
}

/// log2 of a clock's precision in seconds, from the smallest step seen
/// between two readings (rounded up: a precision claims no better than
/// what was seen). 1 ns gives -29, 20 ns -25, 1 µs -19.
pub fn precision_log2(step: Nanos) -> i8 {
    let ns = step.as_nanos().max(1) as u128;
    // Smallest p with 2^p s >= step, i.e. 2^(p+30) >= ns * 2^30 / 1e9.
    let mut p: i32 = -30;
    while p < 10 && (1u128 << (p + 40)) * 1_000_000_000 < ns << 40 {
        p += 1;
    }
    p as i8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_795_986_000_250_000_001; // 2026-11-29T21:00:00.25Z

    fn ts(n: i64) -> Timestamp {
        Timestamp::from_nanos(n)
    }

    #[test]
    fn the_epochs_line_up() {
        // 1970-01-01 is 2 208 988 800 s after 1900-01-01.
        let unix = NtpTimestamp::from_timestamp(Timestamp::EPOCH);
        assert_eq!(unix.0, 2_208_988_800u64 << 32);
        assert_eq!(unix.to_timestamp(ts(NOW)), Timestamp::EPOCH);
        // Half a second is 2^31 in the fraction.
        let half = NtpTimestamp::from_timestamp(ts(500_000_000));
        assert_eq!(half.0 & 0xffff_ffff, 1 << 31);
    }

    #[test]
    fn round_trips_to_the_nanosecond() {
        for n in [
            NOW,
            NOW + 1,
            NOW - 999_999_999,
            0,
            1,
            -1,
            4_000_000_000_000_000_000,
        ] {
            let back = NtpTimestamp::from_timestamp(ts(n)).to_timestamp(ts(n));
            assert_eq!(back, ts(n), "{n}");
        }
    }

    #[test]
    fn era_wrap_in_2036_is_handled() {
        // Era 0 ends at 2036-02-07T06:28:16Z = 2_085_978_496 s Unix.
        let wrap = 2_085_978_496i64 * 1_000_000_000;
        for n in [wrap - 1, wrap, wrap + 1, wrap + 86_400_000_000_000] {
            let t = NtpTimestamp::from_timestamp(ts(n));
            // Seen from just before the wrap, and just after.
            assert_eq!(t.to_timestamp(ts(wrap - 3_600_000_000_000)), ts(n));
            assert_eq!(t.to_timestamp(ts(wrap + 3_600_000_000_000)), ts(n));
        }
        // Just after the wrap the seconds are small.
        assert!(NtpTimestamp::from_timestamp(ts(wrap + 5_000_000_000)).0 >> 32 == 5);
    }

    #[test]
    fn shorts_round_up() {
        assert_eq!(NtpShort(1 << 16).to_nanos(), Nanos::from_secs(1));
        assert_eq!(NtpShort(1).to_nanos(), Nanos::from_nanos(15_259)); // 15258.79 up
        assert_eq!(NtpShort::from_nanos(Nanos::from_nanos(1)), NtpShort(1));
        assert_eq!(NtpShort::from_nanos(Nanos::from_secs(1)), NtpShort(1 << 16));
        assert_eq!(NtpShort::from_nanos(Nanos::from_nanos(-5)), NtpShort(0));
        assert_eq!(
            NtpShort::from_nanos(Nanos::from_secs(100_000)),
            NtpShort(u32::MAX)
        );
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            leap: Leap::AddSecond,
            version: 3,
            mode: Mode::Server,
            stratum: 2,
            poll: -3,
            precision: -24,
            root_delay: NtpShort(0x0001_8000),
            root_dispersion: NtpShort(77),
            reference_id: RefId([192, 0, 2, 1]),
            reference: NtpTimestamp(1),
            origin: NtpTimestamp(u64::MAX),
            receive: NtpTimestamp(0x1234_5678_9abc_def0),
            transmit: NtpTimestamp(42),
        };
        let mut buf = [0u8; HEADER_LEN];
        h.write(&mut buf);
        assert_eq!(buf[0], 0b01_011_100);
        assert_eq!(Header::read(&buf), Some(h));
        assert_eq!(Header::read(&buf[..47]), None);
    }

    fn request(transmit: u64) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        write_request(NtpTimestamp(transmit), 6, &mut buf);
        buf
    }

    #[test]
    fn a_request_is_read_and_answered() {
        let req = request(0xdead_beef_0000_0001);
        let parsed = parse_request(&req).unwrap();
        assert_eq!(parsed.header.mode, Mode::Client);
        assert_eq!(parsed.header.poll, 6);
        assert!(parsed.fields.is_empty());
        let state = ServerState {
            leap: Leap::None,
            stratum: 2,
            precision: -25,
            root_delay: Nanos::from_micros(300),
            root_dispersion: Nanos::from_micros(150),
            reference_id: RefId::LOCAL,
            reference_time: ts(NOW - 16_000_000_000),
        };
        let mut out = [0u8; 64];
        let len = write_reply(
            parsed.header.echo(),
            &state,
            ts(NOW),
            ts(NOW + 20_000),
            &mut out,
        );
        assert_eq!(len, HEADER_LEN);
        let reply = check_reply(&out[..len], NtpTimestamp(0xdead_beef_0000_0001)).unwrap();
        let Reply::Time {
            receive,
            transmit,
            state: got,
        } = reply
        else {
            panic!("{reply:?}");
        };
        assert_eq!(receive.to_timestamp(ts(NOW)), ts(NOW));
        assert_eq!(transmit.to_timestamp(ts(NOW)), ts(NOW + 20_000));
        assert_eq!(got.stratum, 2);
        assert_eq!(got.reference_id, RefId::LOCAL);
        // 16.16 rounding up never shrinks what the server said.
        assert!(got.root_delay >= state.root_delay);
        assert!(got.root_dispersion >= state.root_dispersion);
        assert!(got.root_distance() >= state.root_distance());
        // Each rounds up by less than one 16.16 unit (15.3 µs).
        assert!(got.root_distance() < Nanos::from_micros(331));
    }

    #[test]
    fn control_and_other_modes_are_refused() {
        let mut req = request(1);
        req[0] = (4 << 3) | 6;
        assert_eq!(parse_request(&req), Err(PacketError::Control(6)));
        req[0] = (2 << 3) | 7;
        assert_eq!(parse_request(&req), Err(PacketError::Control(7)));
        req[0] = (4 << 3) | 4;
        assert_eq!(parse_request(&req), Err(PacketError::Mode(4)));
        req[0] = (2 << 3) | 3;
        assert_eq!(parse_request(&req), Err(PacketError::Version(2)));
        req[0] = (3 << 3) | 3;
        assert!(parse_request(&req).is_ok());
        assert_eq!(parse_request(&req[..47]), Err(PacketError::TooShort(47)));
    }

    #[test]
    fn extension_fields_are_split_and_macs_refused() {
        let mut pkt = request(1).to_vec();
        let mut field = [0u8; 40];
        let n = write_field(&mut field, 0x0104, &[7u8; 32]).unwrap();
        assert_eq!(n, 36);
        pkt.extend_from_slice(&field[..n]);
        let n = write_field(&mut field, 0x7777, &[1, 2, 3]).unwrap();
        assert_eq!(n, 16); // padded to the minimum
        pkt.extend_from_slice(&field[..n]);
        let parsed = parse_request(&pkt).unwrap();
        assert_eq!(parsed.fields.len(), 2);
        assert_eq!(parsed.fields[0].kind, 0x0104);
        assert_eq!(parsed.fields[0].value, &[7u8; 32]);
        assert_eq!(parsed.fields[1].kind, 0x7777);
        assert_eq!(&parsed.fields[1].value[..3], &[1, 2, 3]);

        let mut with_mac = request(1).to_vec();
        with_mac.extend_from_slice(&[0u8; 20]);
        assert_eq!(parse_request(&with_mac), Err(PacketError::Mac));

        for bad_len in [8usize, 12, 17, 30] {
            let mut bad = request(1).to_vec();
            bad.extend(std::iter::repeat_n(0xff, bad_len));
            assert!(
                matches!(parse_request(&bad), Err(PacketError::Malformed(_))),
                "{bad_len}"
            );
        }
        // A field claiming more than is there.
        let mut long = request(1).to_vec();
        long.extend_from_slice(&[0, 1, 0, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            parse_request(&long),
            Err(PacketError::Malformed(_))
        ));
    }

    fn reply_with(f: impl FnOnce(&mut Header)) -> [u8; HEADER_LEN] {
        let mut h = Header {
            leap: Leap::None,
            version: 4,
            mode: Mode::Server,
            stratum: 1,
            reference_id: RefId(*b"GPS\0"),
            origin: NtpTimestamp(99),
            receive: NtpTimestamp::from_timestamp(ts(NOW)),
            transmit: NtpTimestamp::from_timestamp(ts(NOW + 1)),
            ..Header::default()
        };
        f(&mut h);
        let mut buf = [0u8; HEADER_LEN];
        h.write(&mut buf);
        buf
    }

    #[test]
    fn replies_are_checked_origin_first() {
        let cookie = NtpTimestamp(99);
        assert!(matches!(
            check_reply(&reply_with(|_| {}), cookie),
            Ok(Reply::Time { .. })
        ));
        // A spoofed KoD (wrong origin) is not a KoD.
        let spoof = reply_with(|h| {
            h.stratum = 0;
            h.reference_id = RefId::DENY;
            h.origin = NtpTimestamp(98);
        });
        assert_eq!(check_reply(&spoof, cookie), Err(ReplyError::Unmatched));
        let kod = reply_with(|h| {
            h.stratum = 0;
            h.leap = Leap::Unsynchronized;
            h.reference_id = RefId::RATE;
        });
        assert_eq!(check_reply(&kod, cookie), Ok(Reply::Kiss(Kiss::Rate)));
        let deny = reply_with(|h| {
            h.stratum = 0;
            h.reference_id = RefId::DENY;
        });
        assert_eq!(check_reply(&deny, cookie), Ok(Reply::Kiss(Kiss::Deny)));
        assert!(Kiss::Deny.stops() && Kiss::Restricted.stops() && !Kiss::Rate.stops());
        let unsync = reply_with(|h| h.leap = Leap::Unsynchronized);
        assert!(matches!(
            check_reply(&unsync, cookie),
            Err(ReplyError::Unsynchronized { leap: 3, .. })
        ));
        let s16 = reply_with(|h| h.stratum = 16);
        assert!(matches!(
            check_reply(&s16, cookie),
            Err(ReplyError::Unsynchronized { stratum: 16, .. })
        ));
        let zero = reply_with(|h| h.transmit = NtpTimestamp::ZERO);
        assert_eq!(check_reply(&zero, cookie), Err(ReplyError::ZeroTimestamp));
        let mode3 = reply_with(|h| h.mode = Mode::Client);
        assert!(matches!(
            check_reply(&mode3, cookie),
            Err(ReplyError::Packet(PacketError::Mode(3)))
        ));
        // A zero cookie matches nothing, even a reply with zero origin.
        let zero_origin = reply_with(|h| h.origin = NtpTimestamp::ZERO);
        assert_eq!(
            check_reply(&zero_origin, NtpTimestamp::ZERO),
            Err(ReplyError::Unmatched)
        );
    }

    #[test]
    fn a_kiss_reveals_no_time_and_is_no_larger() {
        let bytes = request(0x1111_2222_3333_4444);
        let req = parse_request(&bytes).unwrap();
        let mut out = [0xaau8; 64];
        let len = write_kiss(req.header.echo(), RefId::RATE, &mut out);
        assert_eq!(len, HEADER_LEN);
        let h = Header::read(&out).unwrap();
        assert_eq!(
            (h.stratum, h.leap, h.reference_id),
            (0, Leap::Unsynchronized, RefId::RATE)
        );
        assert_eq!(h.receive, req.header.transmit);
        assert_eq!(h.transmit, req.header.transmit);
        assert_eq!(
            check_reply(&out[..len], NtpTimestamp(0x1111_2222_3333_4444)),
            Ok(Reply::Kiss(Kiss::Rate))
        );
    }

    #[test]
    fn reference_ids_display() {
        assert_eq!(RefId(*b"GPS\0").display(1), "GPS");
        assert_eq!(RefId::RATE.display(0), "RATE");
        assert_eq!(RefId::LOCAL.display(2), "127.127.1.1");
        assert_eq!(RefId([1, 2, 3, 4]).display(1), "1.2.3.4");
    }

    #[test]
    fn precision_from_the_step() {
        assert_eq!(precision_log2(Nanos::from_nanos(1)), -29);
        assert_eq!(precision_log2(Nanos::from_nanos(20)), -25);
        assert_eq!(precision_log2(Nanos::from_nanos(29)), -25);
        assert_eq!(precision_log2(Nanos::from_nanos(30)), -24); // 2^-25 s is 29.8 ns
        assert_eq!(precision_log2(Nanos::from_micros(1)), -19);
        assert_eq!(precision_log2(Nanos::from_millis(1)), -9);
        assert_eq!(precision_log2(Nanos::ZERO), -29);
    }

    #[test]
    fn root_distance_is_half_the_delay_plus_the_dispersion() {
        let s = ServerState {
            leap: Leap::None,
            stratum: 3,
            precision: -20,
            root_delay: Nanos::from_nanos(1_001),
            root_dispersion: Nanos::from_nanos(10),
            reference_id: RefId([0; 4]),
            reference_time: Timestamp::EPOCH,
        };
        assert_eq!(s.root_distance(), Nanos::from_nanos(511));
        assert!(s.is_synchronized());
        assert!(!ServerState { stratum: 16, ..s }.is_synchronized());
        assert!(!ServerState { stratum: 0, ..s }.is_synchronized());
        assert!(
            !ServerState {
                leap: Leap::Unsynchronized,
                ..s
            }
            .is_synchronized()
        );
    }

    #[test]
    fn what_a_server_says_of_its_clock() {
        use crate::clock::KernelClock;
        let now = ts(NOW);
        let synced = KernelClock {
            synchronized: true,
            leap: Leap::AddSecond,
            max_error: Nanos::from_micros(1_500),
            est_error: Nanos::from_micros(20),
        };
        let s = ServerState::serving(&synced, None, -25, now);
        assert_eq!((s.leap, s.stratum), (Leap::AddSecond, 2));
        assert_eq!(s.root_distance(), Nanos::from_micros(1_500));
        assert!(s.is_synchronized());
        assert_eq!(ServerState::serving(&synced, Some(5), -25, now).stratum, 5);

        let unsynced = KernelClock {
            synchronized: false,
            leap: Leap::None,
            max_error: Nanos::from_secs(16),
            est_error: Nanos::from_secs(16),
        };
        let s = ServerState::serving(&unsynced, None, -25, now);
        assert_eq!((s.leap, s.stratum), (Leap::Unsynchronized, 16));
        assert!(!s.is_synchronized());
        // The operator vouches for it: served, as chrony's `local stratum`.
        let s = ServerState::serving(&unsynced, Some(3), -25, now);
        assert_eq!(
            (s.leap, s.stratum, s.reference_id),
            (Leap::None, 3, RefId::LOCAL)
        );
        assert!(s.is_synchronized());
        assert_eq!(s.root_dispersion, Nanos::ZERO);
        // A client still allows for the precision of the readings.
        assert_eq!(s.uncertainty(), Nanos::from_nanos(30)); // 2^-25 s
        assert!(s.reference_time < now);
    }

    #[test]
    fn precision_as_a_span() {
        assert_eq!(precision_nanos(-25), Nanos::from_nanos(30));
        assert_eq!(precision_nanos(-20), Nanos::from_nanos(954));
        assert_eq!(precision_nanos(0), Nanos::from_secs(1));
        assert_eq!(precision_nanos(-128), Nanos::from_nanos(1));
    }

    /// The conversions as first written, in 128-bit arithmetic: the
    /// oracle for the 64-bit ones.
    fn from_timestamp_wide(t: Timestamp) -> NtpTimestamp {
        let nanos = i128::from(t.as_nanos()) + UNIX_OFFSET_SECS * NANOS_PER_SEC;
        let secs = nanos.div_euclid(NANOS_PER_SEC);
        let sub = nanos.rem_euclid(NANOS_PER_SEC);
        let frac = ((sub << 32) + NANOS_PER_SEC / 2) / NANOS_PER_SEC;
        NtpTimestamp(((secs << 32) + frac) as u64)
    }

    fn short_from_nanos_wide(n: Nanos) -> NtpShort {
        let n = n.as_nanos().max(0) as u128;
        let v = (n << 16).div_ceil(1_000_000_000);
        NtpShort(v.min(u128::from(u32::MAX)) as u32)
    }

    #[test]
    fn the_fast_conversions_match_the_wide_ones_at_the_edges() {
        let second = 1_000_000_000i64;
        for n in [
            i64::MIN,
            i64::MIN + 1,
            i64::MAX,
            i64::MAX - 1,
            0,
            -1,
            1,
            second - 1,
            -second,
            NOW,
            // A fraction that rounds up to the next second.
            NOW - NOW % second + second - 1,
            -(UNIX_OFFSET_SECS as i64) * second,
            -(UNIX_OFFSET_SECS as i64) * second - 1,
        ] {
            assert_eq!(
                NtpTimestamp::from_timestamp(ts(n)),
                from_timestamp_wide(ts(n)),
                "{n}"
            );
        }
        for n in [
            i64::MIN,
            -1,
            0,
            1,
            second,
            65_536 * second - 1,
            65_536 * second,
            i64::MAX,
        ] {
            let n = Nanos::from_nanos(n);
            assert_eq!(NtpShort::from_nanos(n), short_from_nanos_wide(n), "{n:?}");
        }
    }

    proptest! {
        #[test]
        fn the_fast_conversions_match_the_wide_ones(n in any::<i64>()) {
            prop_assert_eq!(NtpTimestamp::from_timestamp(ts(n)), from_timestamp_wide(ts(n)));
            let span = Nanos::from_nanos(n);
            prop_assert_eq!(NtpShort::from_nanos(span), short_from_nanos_wide(span));
        }

        #[test]
        fn timestamps_round_trip_within_68_years_of_the_pivot(
            n in i64::MIN / 2..i64::MAX / 2,
            away in -2_000_000_000i64..2_000_000_000,
        ) {
            let t = ts(n);
            let pivot = ts(n.saturating_add(away.saturating_mul(1_000_000_000)));
            prop_assert_eq!(NtpTimestamp::from_timestamp(t).to_timestamp(pivot), t);
        }

        #[test]
        fn a_bare_request_reads_as_the_full_parse_does(
            bytes in any::<[u8; HEADER_LEN]>(), first in any::<u8>()
        ) {
            // Every mode and version, in headers of any content.
            let mut bytes = bytes;
            bytes[0] = first;
            let full = parse_request(&bytes).map(|r| r.header.echo());
            prop_assert_eq!(read_bare_request(&bytes), full);
        }

        #[test]
        // One template answers a whole batch: each reply it writes reads
        // back as the header written field by field for that request.
        fn a_template_writes_what_the_header_says(
            leap in 0u8..4, stratum in any::<u8>(), precision in any::<i8>(),
            delay in any::<i64>(), dispersion in any::<i64>(), id in any::<[u8; 4]>(),
            reference in any::<i64>(), ts3 in any::<i64>(),
            requests in prop::collection::vec((0u8..8, any::<i8>(), any::<u64>(), any::<i64>()), 1..5),
        ) {
            let state = ServerState {
                leap: Leap::from_bits(leap),
                stratum,
                precision,
                root_delay: Nanos::from_nanos(delay),
                root_dispersion: Nanos::from_nanos(dispersion),
                reference_id: RefId(id),
                reference_time: ts(reference),
            };
            let template = ReplyTemplate::new(&state, ts(ts3));
            for (version, poll, transmit, ts2) in requests {
                let echo = Echo { version, poll, transmit: NtpTimestamp(transmit) };
                let mut out = [0u8; HEADER_LEN];
                prop_assert_eq!(template.write(echo, ts(ts2), &mut out), HEADER_LEN);
                let mut expected = [0u8; HEADER_LEN];
                Header {
                    leap: state.leap,
                    version,
                    mode: Mode::Server,
                    stratum: stratum.min(MAX_STRATUM),
                    poll,
                    precision,
                    root_delay: NtpShort::from_nanos(state.root_delay),
                    root_dispersion: NtpShort::from_nanos(state.root_dispersion),
                    reference_id: RefId(id),
                    reference: NtpTimestamp::from_timestamp(ts(reference)),
                    origin: NtpTimestamp(transmit),
                    receive: NtpTimestamp::from_timestamp(ts(ts2)),
                    transmit: NtpTimestamp::from_timestamp(ts(ts3)),
                }
                .write(&mut expected);
                prop_assert_eq!(out, expected);
            }
        }

        #[test]
        fn no_datagram_panics_the_parsers(bytes in prop::collection::vec(any::<u8>(), 0..1200)) {
            let _ = parse_request(&bytes);
            let _ = check_reply(&bytes, NtpTimestamp(1));
        }

        #[test]
        // Fields of 28 bytes and more: a last field of 20 or 24 bytes would
        // read as a MAC (RFC 7822 §7.5), which no client sends.
        fn replies_are_never_larger_than_requests(
            fields in prop::collection::vec((any::<u16>(), prop::collection::vec(any::<u8>(), 24..60)), 0..4),
        ) {
            let mut pkt = request(5).to_vec();
            for (kind, value) in &fields {
                let mut buf = [0u8; 80];
                let n = write_field(&mut buf, *kind, value).unwrap();
                pkt.extend_from_slice(&buf[..n]);
            }
            let req = parse_request(&pkt).unwrap();
            let mut out = [0u8; 1200];
            let state = ServerState {
                leap: Leap::None, stratum: 1, precision: -20, root_delay: Nanos::ZERO,
                root_dispersion: Nanos::ZERO, reference_id: RefId::LOCAL, reference_time: ts(NOW),
            };
            prop_assert!(write_reply(req.header.echo(), &state, ts(NOW), ts(NOW), &mut out) <= req.len);
            prop_assert!(write_kiss(req.header.echo(), RefId::RATE, &mut out) <= req.len);
        }
    }
}
