//! Network Time Security (RFC 8915), the pure half.
pub mod aead;
pub mod cookie;
pub mod ef;
pub mod ke;
