//! Network Time Security (RFC 8915), the pure half: codecs, cryptography
//! and protocol logic as functions over bytes. The TLS 1.3 session of
//! NTS-KE, the sockets and the clocks belong to the callers (cerv's NTP
//! server and key-exchange listener, fient's NTP client).
//!
//! - [`ke`]: NTS Key Establishment records, an incremental decoder, the
//!   client's request and response parsing, the server's negotiation and
//!   response, and what to export from TLS ([`ke::export_keys`]).
//! - [`aead`]: AEAD_AES_SIV_CMAC_256, the one algorithm (id 15), and
//!   [`aead::Key`], wiped on drop; over [`aes128`], AES-128 with AES-NI.
//! - [`cookie`]: the server's cookies, sealed under rotating
//!   [`cookie::MasterKeys`].
//! - [`ef`]: the NTS extension fields of NTPv4 requests and replies: write
//!   and check on each side, and the NTS NAK.
//! - [`jar`]: [`CookieJar`], the client's unspent cookies.
//!
//! One exchange, end to end:
//!
//! ```text
//! client                                     server
//! ke::write_request ──── TLS (ntske/1) ────► Decoder → ke::respond (keys: ke::export_keys,
//! Decoder → ke::parse_response ◄────────────   cookies: MasterKeys::seal)
//! ke::export_keys, CookieJar::from_cookies
//!
//! ntp::write_request + ef::write_request ──► ef::open_request → ntp::write_reply
//!   (jar.take(), jar.placeholders())           + ef::write_reply (MasterKeys::seal × wanted)
//!                                            or ef::write_nak (if the error's nak())
//! ef::check_reply → ntp::check_reply ◄──────
//!   (jar.add each cookie; on NtsError::Nak: NTS-KE again)
//! ```

pub mod aead;
pub mod aes128;
pub mod cookie;
pub mod ef;
pub mod jar;
pub mod ke;

pub use aead::{Aead, Key};
pub use cookie::{CookieError, CookieKeys, MasterKeys};
pub use ef::{NtsError, NtsRequest};
pub use jar::CookieJar;
pub use ke::{KeError, KeResponse};
