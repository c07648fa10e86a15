//! Server cookies (RFC 8915 §6): the session keys a client got from NTS-KE,
//! sealed under a master key only the server holds, so the server keeps no
//! state per client. The format is the server's own business; ours is
//!
//! ```text
//! key id (4, big-endian) ‖ nonce (16) ‖ AES-SIV(master key; ad = key id, nonce;
//!                                               aead id (2) ‖ 0 (2) ‖ c2s (32) ‖ s2c (32))
//! ```
//!
//! 4 + 16 + 16 (tag) + 68 = [`COOKIE_LEN`] = 104 bytes. The two zero bytes
//! keep the cookie a multiple of 4 long: chrony's client skips NTS-KE
//! cookies whose length is not (`nts_ke_client.c`), and NTP extension
//! fields pad to 4 anyway, so a cookie of another length would not come
//! back byte for byte. The key id is authenticated as associated data, so
//! a cookie cannot be moved to another key's id.
//!
//! Master keys rotate: [`MasterKeys`] holds the current key and the ones
//! before it, [`DEFAULT_KEEP`] in all, so a cookie opens for between
//! `keep - 1` and `keep` rotation periods after it was issued. chrony does
//! the same (`ntsrotate`, a week by default; four key slots, one of them a
//! pre-generated future key, so the current key and two before it open
//! cookies). Clients get fresh cookies with every reply, so only a client
//! silent for that long needs NTS-KE again.

use super::aead::{self, Aead, Cipher, Key, NONCE_LEN, TAG_LEN};
use std::collections::VecDeque;
use zeroize::Zeroize;

/// Bytes of the key id in front of every cookie.
const KEY_ID_LEN: usize = 4;
/// Bytes of the sealed plaintext: aead id, reserved, both keys.
const PLAIN_LEN: usize = 4 + 2 * aead::KEY_LEN;
/// Bytes in every cookie this server issues.
pub const COOKIE_LEN: usize = KEY_ID_LEN + NONCE_LEN + TAG_LEN + PLAIN_LEN;
/// How many master keys are held by default: the current one and two
/// before it.
pub const DEFAULT_KEEP: usize = 3;

/// The session keys a cookie carries: the algorithm and the two
/// directions' keys exported from the NTS-KE TLS session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieKeys {
    /// The negotiated algorithm.
    pub aead: Aead,
    /// Client-to-server key: requests are authenticated with it.
    pub c2s: Key,
    /// Server-to-client key: replies are authenticated with it.
    pub s2c: Key,
}

/// Why a cookie did not open. Every one means the same to the client (an
/// NTS NAK: get new cookies), but they are counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// Not the length of any cookie this server issues.
    #[error("cookie of {0} bytes (ours are {COOKIE_LEN})")]
    Length(usize),
    /// Sealed under a master key rotated out long ago, or never ours.
    #[error("cookie sealed under unknown master key {0:#010x}")]
    UnknownKey(u32),
    /// Altered, forged, or sealed under another key with the same id.
    #[error("cookie does not authenticate")]
    Tag,
    /// Authentic, but naming an algorithm this server no longer speaks.
    #[error("cookie for unsupported AEAD algorithm {0}")]
    Algorithm(u16),
    /// Authentic, but not laid out as this version seals cookies.
    #[error("cookie contents in an unknown layout")]
    Contents,
}

struct MasterKey {
    id: u32,
    /// Prepared once: every request opens a cookie and seals another.
    cipher: Cipher,
}

impl MasterKey {
    fn new(id: u32, key: &Key) -> MasterKey {
        MasterKey {
            id,
            cipher: key.cipher(),
        }
    }
}

/// The server's master keys: the current one seals, all of them open.
pub struct MasterKeys {
    /// Newest first.
    keys: VecDeque<MasterKey>,
    keep: usize,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u32> = self.keys.iter().map(|k| k.id).collect();
        f.debug_struct("MasterKeys")
            .field("ids", &ids)
            .field("keep", &self.keep)
            .finish()
    }
}

impl MasterKeys {
    /// A set holding one key, `key` with id `id`, that keeps
    /// [`DEFAULT_KEEP`] keys across rotations.
    pub fn new(id: u32, key: Key) -> MasterKeys {
        MasterKeys::with_keep(id, key, DEFAULT_KEEP)
    }

    /// Like [`MasterKeys::new`], keeping `keep` keys (at least 1).
    pub fn with_keep(id: u32, key: Key, keep: usize) -> MasterKeys {
        let mut keys = VecDeque::with_capacity(keep.max(1));
        keys.push_front(MasterKey::new(id, &key));
        MasterKeys {
            keys,
            keep: keep.max(1),
        }
    }

    /// A set with a fresh random key and a random id.
    pub fn generate() -> MasterKeys {
        MasterKeys::new(rand::random(), Key::generate())
    }

    /// Makes `key` the current key, with the id after the current one's,
    /// and forgets the oldest if more than `keep` are held. Servers that
    /// share master keys stay in step by rotating the same keys.
    pub fn rotate(&mut self, key: Key) {
        let id = self.current_id().wrapping_add(1);
        self.keys.push_front(MasterKey::new(id, &key));
        self.keys.truncate(self.keep);
    }

    /// The id of the key that seals new cookies.
    pub fn current_id(&self) -> u32 {
        self.keys.front().map_or(0, |k| k.id)
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true: there is always a current key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Seals `keys` into a [`COOKIE_LEN`]-byte cookie under the current
    /// master key. `nonce` must be fresh random bytes: SIV stays safe if
    /// one repeats, but two cookies with the same nonce and keys would be
    /// equal, and cookies must not link a client's requests.
    pub fn seal(&self, keys: &CookieKeys, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
        let mut cookie = [0u8; COOKIE_LEN];
        self.seal_into(keys, nonce, &mut cookie);
        cookie.to_vec()
    }

    /// [`seal`](Self::seal) into a buffer of the caller's (a server seals
    /// a fresh cookie for every request it answers).
    pub fn seal_into(
        &self,
        keys: &CookieKeys,
        nonce: &[u8; NONCE_LEN],
        cookie: &mut [u8; COOKIE_LEN],
    ) {
        let Some(master) = self.keys.front() else {
            return; // unreachable: there is always a current key
        };
        let id = master.id.to_be_bytes();
        let mut plain = [0u8; PLAIN_LEN];
        plain[..2].copy_from_slice(&keys.aead.id().to_be_bytes());
        plain[4..4 + aead::KEY_LEN].copy_from_slice(keys.c2s.as_bytes());
        plain[4 + aead::KEY_LEN..].copy_from_slice(keys.s2c.as_bytes());
        cookie[..KEY_ID_LEN].copy_from_slice(&id);
        cookie[KEY_ID_LEN..KEY_ID_LEN + NONCE_LEN].copy_from_slice(nonce);
        // The buffer is exactly the right size and the nonce is not empty.
        let _ = master
            .cipher
            .seal(nonce, &id, &plain, &mut cookie[KEY_ID_LEN + NONCE_LEN..]);
        plain.zeroize();
    }

    /// Opens a cookie this server sealed under one of the keys it holds.
    pub fn open(&self, cookie: &[u8]) -> Result<CookieKeys, CookieError> {
        if cookie.len() != COOKIE_LEN {
            return Err(CookieError::Length(cookie.len()));
        }
        let (id, rest) = cookie.split_at(KEY_ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        let master = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or(CookieError::UnknownKey(key_id))?;
        let mut plain = [0u8; PLAIN_LEN];
        let opened = master.cipher.open(nonce, id, sealed, &mut plain);
        let result = match opened {
            Err(_) => Err(CookieError::Tag),
            Ok(_) => {
                let aead_id = u16::from_be_bytes([plain[0], plain[1]]);
                match Aead::from_id(aead_id) {
                    None => Err(CookieError::Algorithm(aead_id)),
                    Some(_) if plain[2..4] != [0, 0] => Err(CookieError::Contents),
                    Some(aead) => {
                        let mut c2s = [0u8; aead::KEY_LEN];
                        let mut s2c = [0u8; aead::KEY_LEN];
                        c2s.copy_from_slice(&plain[4..4 + aead::KEY_LEN]);
                        s2c.copy_from_slice(&plain[4 + aead::KEY_LEN..]);
                        Ok(CookieKeys {
                            aead,
                            c2s: Key::from_bytes(c2s),
                            s2c: Key::from_bytes(s2c),
                        })
                    }
                }
            }
        };
        plain.zeroize();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(c2s: u8, s2c: u8) -> CookieKeys {
        CookieKeys {
            aead: Aead::AesSivCmac256,
            c2s: Key::from_bytes([c2s; 32]),
            s2c: Key::from_bytes([s2c; 32]),
        }
    }

    fn master() -> MasterKeys {
        MasterKeys::new(0x1000, Key::from_bytes([0x42; 32]))
    }

    #[test]
    fn a_cookie_round_trips_and_is_a_multiple_of_four() {
        let m = master();
        let cookie = m.seal(&keys(1, 2), &[9; 16]);
        assert_eq!(cookie.len(), COOKIE_LEN);
        assert_eq!(COOKIE_LEN, 104);
        assert_eq!(COOKIE_LEN % 4, 0);
        assert_eq!(cookie[..4], 0x1000u32.to_be_bytes());
        assert_eq!(m.open(&cookie), Ok(keys(1, 2)));
        // Another nonce, another cookie for the same keys.
        let other = m.seal(&keys(1, 2), &[8; 16]);
        assert_ne!(other, cookie);
        assert_eq!(m.open(&other), Ok(keys(1, 2)));
    }

    #[test]
    fn bad_cookies_are_typed() {
        let m = master();
        let cookie = m.seal(&keys(1, 2), &[9; 16]);
        assert_eq!(m.open(&[]), Err(CookieError::Length(0)));
        assert_eq!(m.open(&cookie[..103]), Err(CookieError::Length(103)));
        assert_eq!(
            m.open(&[cookie.as_slice(), &[0]].concat()),
            Err(CookieError::Length(105))
        );
        let mut moved = cookie.clone();
        moved[3] ^= 1;
        assert_eq!(m.open(&moved), Err(CookieError::UnknownKey(0x1001)));
        // The same key under another id: the id is authenticated.
        let mut twin = MasterKeys::new(0x1001, Key::from_bytes([0x42; 32]));
        twin.rotate(Key::from_bytes([0x43; 32]));
        let mut relabelled = cookie.clone();
        relabelled[..4].copy_from_slice(&0x1001u32.to_be_bytes());
        assert_eq!(twin.open(&relabelled), Err(CookieError::Tag));
        // Another server's key with our id.
        let stranger = MasterKeys::new(0x1000, Key::from_bytes([0x41; 32]));
        assert_eq!(stranger.open(&cookie), Err(CookieError::Tag));
    }

    #[test]
    fn rotation_keeps_the_last_n_keys() {
        let mut m = MasterKeys::new(u32::MAX, Key::from_bytes([1; 32]));
        let old = m.seal(&keys(1, 2), &[0; 16]);
        for i in 0..DEFAULT_KEEP - 1 {
            m.rotate(Key::from_bytes([10 + i as u8; 32]));
            assert_eq!(m.open(&old), Ok(keys(1, 2)), "after {} rotations", i + 1);
        }
        assert_eq!(m.len(), DEFAULT_KEEP);
        // Ids count on from the first, wrapping.
        assert_eq!(m.current_id(), (DEFAULT_KEEP - 2) as u32);
        let newer = m.seal(&keys(3, 4), &[0; 16]);
        m.rotate(Key::from_bytes([99; 32]));
        assert_eq!(m.len(), DEFAULT_KEEP);
        assert_eq!(m.open(&old), Err(CookieError::UnknownKey(u32::MAX)));
        assert_eq!(m.open(&newer), Ok(keys(3, 4)));
    }

    #[test]
    fn keeping_one_key_forgets_at_the_first_rotation() {
        let mut m = MasterKeys::with_keep(5, Key::from_bytes([1; 32]), 0);
        let c = m.seal(&keys(1, 2), &[0; 16]);
        assert_eq!(m.open(&c), Ok(keys(1, 2)));
        m.rotate(Key::generate());
        assert_eq!(m.open(&c), Err(CookieError::UnknownKey(5)));
        assert!(!m.is_empty());
    }

    #[test]
    fn debug_shows_no_secrets() {
        let shown = format!("{:?} {:?}", master(), keys(0xab, 0xcd));
        assert!(!shown.contains("66"), "{shown}"); // 0x42 = 66
        assert!(!shown.contains("171") && !shown.contains("205"), "{shown}");
    }

    proptest! {
        #[test]
        fn cookies_round_trip(c2s in any::<[u8; 32]>(), s2c in any::<[u8; 32]>(),
                              master_key in any::<[u8; 32]>(), id in any::<u32>(),
                              nonce in any::<[u8; 16]>()) {
            let m = MasterKeys::new(id, Key::from_bytes(master_key));
            let k = CookieKeys { aead: Aead::AesSivCmac256, c2s: Key::from_bytes(c2s), s2c: Key::from_bytes(s2c) };
            prop_assert_eq!(m.open(&m.seal(&k, &nonce)), Ok(k));
        }

        #[test]
        fn no_byte_string_panics_open(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = master().open(&bytes);
        }

        #[test]
        fn any_altered_byte_fails(i in 0..COOKIE_LEN, bit in 0u8..8) {
            let m = master();
            let mut c = m.seal(&keys(1, 2), &[7; 16]);
            c[i] ^= 1 << bit;
            prop_assert!(m.open(&c).is_err());
        }
    }
}
