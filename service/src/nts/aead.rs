//! AEAD_AES_SIV_CMAC_256 (RFC 5297, IANA AEAD id 15): the one algorithm
//! NTS requires, and the only one chrony 4.3 offers or accepts.
//!
//! SIV takes a list of associated-data components and, in its
//! nonce-based form, the nonce as the **last** component (RFC 5297 §3).
//! NTS uses one component of associated data (the NTP packet up to the
//! authenticator) and then the nonce, the order nettle's
//! `siv_cmac_aes128_encrypt_message` (what chrony calls) hashes them in.
//! The output is the 16-byte synthetic IV (the tag) followed by the
//! ciphertext, which is as long as the plaintext.
//!
//! A key is 32 bytes: the first half keys CMAC (S2V), the second AES-CTR.
//! Nonces may be any non-empty length; this crate always sends 16 random
//! bytes, and accepts what peers send.

use super::aes128::{Aes128, Block};
use std::fmt;
use zeroize::Zeroize;

/// Bytes in an AEAD_AES_SIV_CMAC_256 key.
pub const KEY_LEN: usize = 32;
/// Bytes of the tag (the synthetic IV) in front of every ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes of the nonces this crate sends (RFC 5297 recommends at least
/// 128 random bits; chrony and ntpd-rs send 16 as well).
pub const NONCE_LEN: usize = 16;

/// An AEAD algorithm NTS can negotiate (IANA "AEAD Algorithms" registry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aead {
    /// AEAD_AES_SIV_CMAC_256, id 15: mandatory to implement (RFC 8915).
    AesSivCmac256,
}

impl Aead {
    /// Every algorithm this crate implements, most preferred first: what a
    /// client offers.
    pub const ALL: [Aead; 1] = [Aead::AesSivCmac256];

    /// The IANA id, as sent in NTS-KE records and key-export contexts.
    pub fn id(self) -> u16 {
        match self {
            Aead::AesSivCmac256 => 15,
        }
    }

    /// The algorithm with this IANA id, if this crate implements it.
    pub fn from_id(id: u16) -> Option<Aead> {
        match id {
            15 => Some(Aead::AesSivCmac256),
            _ => None,
        }
    }

    /// Bytes of key material to export from TLS for each direction.
    pub fn key_len(self) -> usize {
        match self {
            Aead::AesSivCmac256 => KEY_LEN,
        }
    }
}

impl fmt::Display for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aead::AesSivCmac256 => f.write_str("AEAD_AES_SIV_CMAC_256"),
        }
    }
}

/// A secret AEAD_AES_SIV_CMAC_256 key, wiped from memory when dropped and
/// never printed.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// A key from a slice, if it is exactly [`KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Key> {
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(bytes.get(..KEY_LEN).filter(|_| bytes.len() == KEY_LEN)?);
        Some(Key(key))
    }

    /// A fresh random key.
    pub fn generate() -> Key {
        Key(rand::random())
    }

    /// The key's bytes (to seal them into a cookie).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key prepared for use: worth keeping for a key that seals or
    /// opens many messages (a server's master key), since preparing costs
    /// about a quarter of a small message's sealing.
    pub fn cipher(&self) -> Cipher {
        Cipher::new(self)
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PartialEq for Key {
    /// In constant time.
    fn eq(&self, other: &Key) -> bool {
        constant_time_eq::constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<hidden>)")
    }
}

/// Why sealing or opening failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AeadError {
    /// SIV needs a nonce of at least one byte (an empty one would change
    /// which S2V inputs are hashed, and no peer sends one).
    #[error("empty nonce")]
    EmptyNonce,
    /// Shorter than a tag: cannot be a ciphertext.
    #[error("ciphertext of {0} bytes is shorter than the {TAG_LEN}-byte tag")]
    TooShort(usize),
    /// The output buffer cannot hold the result.
    #[error("output buffer of {have} bytes, {need} needed")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The tag does not match: wrong key, or altered nonce, associated
    /// data or ciphertext.
    #[error("authentication failed")]
    Authentication,
}

/// Encrypts `plaintext` under `key`, authenticating `ad` and `nonce` too,
/// into `out` as tag ‖ ciphertext. Returns the bytes written,
/// `TAG_LEN + plaintext.len()`.
pub fn seal(
    key: &Key,
    nonce: &[u8],
    ad: &[u8],
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<usize, AeadError> {
    Cipher::for_len(key, plaintext.len()).seal(nonce, ad, plaintext, out)
}

/// Decrypts tag ‖ ciphertext into `out` if it authenticates under `key`
/// with `ad` and `nonce`; returns the plaintext's length. On failure `out`
/// holds nothing of the plaintext.
pub fn open(
    key: &Key,
    nonce: &[u8],
    ad: &[u8],
    ciphertext: &[u8],
    out: &mut [u8],
) -> Result<usize, AeadError> {
    Cipher::for_len(key, ciphertext.len().saturating_sub(TAG_LEN)).open(nonce, ad, ciphertext, out)
}

/// SIV over any list of components (the nonce last, when there is one).
fn seal_components(
    siv: &Cipher,
    components: &[&[u8]],
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<usize, AeadError> {
    if components.last().is_some_and(|nonce| nonce.is_empty()) {
        return Err(AeadError::EmptyNonce);
    }
    let need = TAG_LEN + plaintext.len();
    let have = out.len();
    let (tag_out, body) = out
        .get_mut(..need)
        .ok_or(AeadError::BufferTooSmall { need, have })?
        .split_at_mut(TAG_LEN);
    let tag = siv.s2v(components, plaintext);
    body.copy_from_slice(plaintext);
    siv.ctr(&tag, body);
    tag_out.copy_from_slice(&tag);
    Ok(need)
}

fn open_components(
    siv: &Cipher,
    components: &[&[u8]],
    ciphertext: &[u8],
    out: &mut [u8],
) -> Result<usize, AeadError> {
    if components.last().is_some_and(|nonce| nonce.is_empty()) {
        return Err(AeadError::EmptyNonce);
    }
    if ciphertext.len() < TAG_LEN {
        return Err(AeadError::TooShort(ciphertext.len()));
    }
    let (tag, body) = ciphertext.split_at(TAG_LEN);
    let len = body.len();
    let have = out.len();
    let plain = out
        .get_mut(..len)
        .ok_or(AeadError::BufferTooSmall { need: len, have })?;
    plain.copy_from_slice(body);
    let mut iv = [0u8; TAG_LEN];
    iv.copy_from_slice(tag);
    siv.ctr(&iv, plain);
    if !constant_time_eq::constant_time_eq(&siv.s2v(components, plain), &iv) {
        // Leave nothing of a forged message's decryption behind.
        plain.fill(0);
        return Err(AeadError::Authentication);
    }
    Ok(len)
}

/// AES-SIV (RFC 5297) with AES-128 on both halves of the key, written over
/// [`super::aes128`]'s block cipher: S2V over AES-CMAC (RFC 4493), then
/// AES-CTR. It replaces the generic `aes-siv` crate on the server's hot
/// path (four SIV operations per NTS request) because that crate's CMAC
/// pays for a digest framework around every block and recomputes what
/// depends on the key alone; this one derives the CMAC subkeys and
/// S2V's first value, CMAC(zero), once per key, and runs CTR eight blocks
/// at a time. The tests hold it to RFC 5297's vectors, to chrony's
/// (nettle's) and, on random inputs, to the `aes-siv` crate itself.
pub struct Cipher {
    /// The CMAC half of the key.
    mac: Aes128,
    /// The CTR half of the key; `None` when prepared for messages with no
    /// plaintext (NTS requests and their authenticators), which use only
    /// S2V.
    ctr: Option<Aes128>,
    /// CMAC's subkeys: K1 for a final complete block, K2 for a padded one.
    k1: Block,
    k2: Block,
    /// S2V's starting value, CMAC(K, 0^128).
    d0: Block,
}

impl Cipher {
    /// [`seal`] under this prepared key.
    pub fn seal(
        &self,
        nonce: &[u8],
        ad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, AeadError> {
        seal_components(self, &[ad, nonce], plaintext, out)
    }

    /// [`open`] under this prepared key.
    pub fn open(
        &self,
        nonce: &[u8],
        ad: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, AeadError> {
        open_components(self, &[ad, nonce], ciphertext, out)
    }

    fn new(key: &Key) -> Cipher {
        Cipher::prepare(key, true)
    }

    /// The key prepared for a message of `len` bytes of plaintext: with no
    /// plaintext there is nothing to encrypt, and the CTR half's key
    /// schedule is not built.
    fn for_len(key: &Key, len: usize) -> Cipher {
        Cipher::prepare(key, len > 0)
    }

    fn prepare(key: &Key, with_ctr: bool) -> Cipher {
        let (mac_key, ctr_key) = key.0.split_at(KEY_LEN / 2);
        let mac = Aes128::new(mac_key.try_into().expect("16-byte half"));
        let ctr = with_ctr.then(|| Aes128::new(ctr_key.try_into().expect("16-byte half")));
        let l = mac.encrypt([0; 16]);
        let k1 = dbl(&l);
        let k2 = dbl(&k1);
        // CMAC of one complete zero block: E(0 xor K1).
        let d0 = mac.encrypt(k1);
        Cipher {
            mac,
            ctr,
            k1,
            k2,
            d0,
        }
    }

    /// AES-CMAC over the concatenation of `parts`.
    fn cmac(&self, parts: &[&[u8]]) -> Block {
        let mut x = [0u8; 16];
        let mut buf = [0u8; 16];
        let mut fill = 0;
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                // A full buffer is processed only once more bytes follow:
                // the last block is special.
                if fill == 16 {
                    xor_into(&mut x, &buf);
                    x = self.mac.encrypt(x);
                    fill = 0;
                }
                if fill == 0 && rest.len() > 16 {
                    // Whole blocks straight from the input, keeping at
                    // least one byte back for the buffer.
                    let whole = (rest.len() - 1) / 16 * 16;
                    for block in rest[..whole].chunks_exact(16) {
                        xor_into(&mut x, block.try_into().expect("16 bytes"));
                        x = self.mac.encrypt(x);
                    }
                    rest = &rest[whole..];
                }
                let take = rest.len().min(16 - fill);
                buf[fill..fill + take].copy_from_slice(&rest[..take]);
                fill += take;
                rest = &rest[take..];
            }
        }
        if fill == 16 {
            xor_into(&mut x, &buf);
            xor_into(&mut x, &self.k1);
        } else {
            buf[fill] = 0x80;
            buf[fill + 1..].fill(0);
            xor_into(&mut x, &buf);
            xor_into(&mut x, &self.k2);
        }
        let tag = self.mac.encrypt(x);
        buf.zeroize();
        tag
    }

    /// S2V (RFC 5297 §2.4) over the associated-data components (the nonce
    /// last) and the plaintext: the synthetic IV.
    ///
    /// The components' CMACs, and the plaintext's up to its last block, do
    /// not depend on each other; the processor overlaps their chains on its
    /// own (written to run side by side, they measured no faster).
    fn s2v(&self, components: &[&[u8]], plaintext: &[u8]) -> Block {
        let mut d = self.d0;
        for component in components {
            d = dbl(&d);
            xor_into(&mut d, &self.cmac(&[component]));
        }
        match plaintext.len().checked_sub(16) {
            // T = P xorend D
            Some(n) => {
                let mut end = [0u8; 16];
                end.copy_from_slice(&plaintext[n..]);
                xor_into(&mut end, &d);
                let tag = self.cmac(&[&plaintext[..n], &end]);
                end.zeroize();
                tag
            }
            // T = dbl(D) xor pad(P)
            None => {
                let mut t = dbl(&d);
                for (t, p) in t.iter_mut().zip(plaintext) {
                    *t ^= p;
                }
                t[plaintext.len()] ^= 0x80;
                let tag = self.cmac(&[&t]);
                t.zeroize();
                tag
            }
        }
    }

    /// XORs `data` with the AES-CTR keystream from the IV `v`, its bits 63
    /// and 31 cleared (RFC 5297 §2.5): encryption and decryption alike.
    fn ctr(&self, v: &Block, data: &mut [u8]) {
        /// Blocks per call: what the AES-NI backend runs in parallel.
        const PAR: usize = 8;
        let Some(ctr) = &self.ctr else {
            // Prepared for no plaintext (`for_len`), and given none.
            debug_assert!(data.is_empty());
            return;
        };
        let mut q = *v;
        q[8] &= 0x7f;
        q[12] &= 0x7f;
        let mut counter = u128::from_be_bytes(q);
        let mut stream = [[0u8; 16]; PAR];
        for chunk in data.chunks_mut(16 * PAR) {
            let blocks = chunk.len().div_ceil(16);
            for block in &mut stream[..blocks] {
                *block = counter.to_be_bytes();
                counter = counter.wrapping_add(1);
            }
            ctr.encrypt8(&mut stream[..blocks]);
            for (data, key) in chunk.chunks_mut(16).zip(&stream) {
                for (byte, key) in data.iter_mut().zip(key.iter()) {
                    *byte ^= key;
                }
            }
        }
        for block in &mut stream {
            block.zeroize();
        }
    }
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(<hidden>)")
    }
}

impl Drop for Cipher {
    fn drop(&mut self) {
        // The AES key schedules wipe themselves when dropped.
        self.k1.zeroize();
        self.k2.zeroize();
        self.d0.zeroize();
    }
}

/// Doubling in GF(2^128) (RFC 5297 §2.3), in constant time.
fn dbl(block: &Block) -> Block {
    let x = u128::from_be_bytes(*block);
    ((x << 1) ^ (0u128.wrapping_sub(x >> 127) & 0x87)).to_be_bytes()
}

fn xor_into(dst: &mut Block, src: &Block) {
    *dst = (u128::from_ne_bytes(*dst) ^ u128::from_ne_bytes(*src)).to_ne_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key(s: &str) -> Key {
        Key::from_slice(&hex(s)).unwrap()
    }

    fn sealed(key: &Key, nonce: &[u8], ad: &[u8], pt: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; TAG_LEN + pt.len()];
        assert_eq!(seal(key, nonce, ad, pt, &mut out), Ok(out.len()));
        out
    }

    #[test]
    fn rfc_5297_a2_nonce_is_the_last_component() {
        // RFC 5297 Appendix A.2, "Nonce-Based Authenticated Encryption
        // Example": two associated-data components, then the nonce.
        let k = key("7f7e7d7c 7b7a7978 77767574 73727170 40414243 44454647 48494a4b 4c4d4e4f");
        let ad1 = hex(
            "00112233 44556677 8899aabb ccddeeff deaddada deaddada ffeeddcc bbaa9988 77665544 33221100",
        );
        let ad2 = hex("10203040 50607080 90a0");
        let nonce = hex("09f91102 9d74e35b d84156c5 635688c0");
        let pt = hex(
            "74686973 20697320 736f6d65 20706c61 696e7465 78742074 6f20656e 63727970 74207573 696e6720 5349562d 414553",
        );
        let want = hex(
            "7bdb6e3b 432667eb 06f4d14b ff2fbd0f cb900f2f ddbe4043 26601965 c889bf17 dba77ceb 094fa663 b7a3f748 ba8af829 ea64ad54 4a272e9c 485b62a3 fd5c0d",
        );
        let mut out = vec![0u8; want.len()];
        let n = seal_components(&k.cipher(), &[&ad1, &ad2, &nonce], &pt, &mut out).unwrap();
        assert_eq!(out[..n], want[..]);
        let mut back = vec![0u8; pt.len()];
        let n = open_components(&k.cipher(), &[&ad1, &ad2, &nonce], &want, &mut back).unwrap();
        assert_eq!(back[..n], pt[..]);
        // The nonce moved in front of the associated data is another message.
        assert_eq!(
            open_components(&k.cipher(), &[&nonce, &ad1, &ad2], &want, &mut back),
            Err(AeadError::Authentication)
        );
    }

    /// Vectors from chrony's own unit test of its SIV wrapper
    /// (test/unit/siv.c), which calls nettle's
    /// `siv_cmac_aes128_encrypt_message(nonce, assoc, plaintext)`: what
    /// chrony puts on the wire. `seal(key, nonce, ad, pt)` must agree.
    #[test]
    fn agrees_with_chronys_nettle_vectors() {
        let k = key("0123456789abcdeff0123456789abcdeef0123456789abcddef0123456789abc");
        let cases: [(&str, &str, &str, &str); 6] = [
            // (nonce, associated data, plaintext, tag ‖ ciphertext)
            (
                "101112131415161718191a1b1c1d1e1f",
                "",
                "",
                "223eb594e0e0254b00258e219a1ca421",
            ),
            (
                "101112131415161718191a1b1c1d1e1f",
                "4c9d4fcaed8ae2baad3f3ea6e93c8c8b",
                "",
                "d7201989c6dbc6d661fc62bc865eeeef",
            ),
            (
                "101112131415161718191a1b1c1d1e1f",
                "",
                "4c9d4fcaed8ae2baad3f3ea6e93c8c8b",
                "b6c160e9c2fd2ae8dec5368b2a33ede1 14ffb397345ccbe44aa4deacd9369046",
            ),
            (
                "101112131415161718191a1b1c1d1e",
                "4c9d4fcaed8ae2baad3f3ea6e93c8c",
                "ba997931237e3c53587ed49302abe4",
                "038c4151ba7a8f776e563199420bc703 e76c67c9dab70d5b4406265ad0d23b",
            ),
            (
                "101112131415161718191a1b1c1d1e1f",
                "4c9d4fcaed8ae2baad3f3ea6e93c8c8b",
                "ba997931237e3c53587ed49302abe4a7",
                "5c052365f4570aa0fb383ece9b7585eb 688519360c7c481140cb9b579a0e6532",
            ),
            (
                "101112131415161718191a1b1c1d1e1f d5",
                "4c9d4fcaed8ae2baad3f3ea6e93c8c8b a0",
                "ba997931237e3c53587ed49302abe4a7 08",
                "af584be7821e9619299125e0dd803b49 a511cdb608f376a0b6fa1582f395e1eb bd",
            ),
        ];
        for (nonce, ad, pt, want) in cases {
            let (nonce, ad, pt, want) = (hex(nonce), hex(ad), hex(pt), hex(want));
            assert_eq!(sealed(&k, &nonce, &ad, &pt), want, "nonce {nonce:02x?}");
            let mut back = vec![0u8; pt.len()];
            assert_eq!(open(&k, &nonce, &ad, &want, &mut back), Ok(pt.len()));
            assert_eq!(back, pt);
        }
    }

    #[test]
    fn edge_cases_are_typed() {
        let k = Key::from_bytes([7; KEY_LEN]);
        let mut out = [0u8; 64];
        assert_eq!(
            seal(&k, &[], b"ad", b"pt", &mut out),
            Err(AeadError::EmptyNonce)
        );
        assert_eq!(
            seal(&k, &[1], b"ad", b"pt", &mut out[..17]),
            Err(AeadError::BufferTooSmall { need: 18, have: 17 })
        );
        assert_eq!(
            open(&k, &[1], b"ad", &[0; 15], &mut out),
            Err(AeadError::TooShort(15))
        );
        let c = sealed(&k, &[1], b"ad", b"secret");
        assert_eq!(
            open(&k, &[1], b"ad", &c, &mut out[..5]),
            Err(AeadError::BufferTooSmall { need: 6, have: 5 })
        );
        // A failed open leaves no plaintext behind.
        let mut bad = c.clone();
        bad[0] ^= 1;
        let mut plain = [0xaau8; 6];
        assert_eq!(
            open(&k, &[1], b"ad", &bad, &mut plain),
            Err(AeadError::Authentication)
        );
        assert_eq!(plain, [0; 6]);
        assert_eq!(Key::from_slice(&[0; 31]), None);
        assert_eq!(Key::from_slice(&[0; 33]), None);
        assert_eq!(format!("{k:?}"), "Key(<hidden>)");
        assert_eq!(Aead::from_id(15), Some(Aead::AesSivCmac256));
        assert_eq!(Aead::from_id(30), None);
        assert_eq!(Aead::AesSivCmac256.id(), 15);
        assert_eq!(Aead::AesSivCmac256.key_len(), 32);
    }

    proptest! {
        /// The same bytes as RustCrypto's `aes-siv` crate (what this
        /// module replaced) on random keys, components and plaintexts,
        /// across block boundaries and CTR's eight-block chunks.
        #[test]
        fn agrees_with_the_aes_siv_crate(
            key in any::<[u8; KEY_LEN]>(),
            components in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..70), 1..4),
            pt in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            use aes_siv::KeyInit;
            let parts: Vec<&[u8]> = components.iter().map(Vec::as_slice).collect();
            let mut want = pt.clone();
            let tag = aes_siv::siv::Aes128Siv::new(&key.into())
                .encrypt_inout_detached(&parts, (&mut want[..]).into())
                .unwrap();
            let mut out = vec![0u8; TAG_LEN + pt.len()];
            let k = Key::from_bytes(key);
            prop_assert_eq!(seal_components(&k.cipher(), &parts, &pt, &mut out), Ok(out.len()));
            prop_assert_eq!(&out[..TAG_LEN], &tag[..]);
            prop_assert_eq!(&out[TAG_LEN..], &want[..]);
            let mut back = vec![0u8; pt.len()];
            prop_assert_eq!(open_components(&k.cipher(), &parts, &out, &mut back), Ok(pt.len()));
            prop_assert_eq!(back, pt);
        }

        #[test]
        fn seal_then_open_round_trips_and_any_change_fails(
            key in any::<[u8; KEY_LEN]>(),
            nonce in prop::collection::vec(any::<u8>(), 1..40),
            ad in prop::collection::vec(any::<u8>(), 0..100),
            pt in prop::collection::vec(any::<u8>(), 0..100),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let k = Key::from_bytes(key);
            let c = sealed(&k, &nonce, &ad, &pt);
            let mut back = vec![0u8; pt.len()];
            prop_assert_eq!(open(&k, &nonce, &ad, &c, &mut back), Ok(pt.len()));
            prop_assert_eq!(&back, &pt);
            // Flip one bit anywhere in nonce ‖ ad ‖ ciphertext.
            let mut all = [nonce.clone(), ad.clone(), c.clone()].concat();
            let i = flip.index(all.len());
            all[i] ^= 1 << bit;
            let (n2, rest) = all.split_at(nonce.len());
            let (a2, c2) = rest.split_at(ad.len());
            prop_assert_eq!(open(&k, n2, a2, c2, &mut back), Err(AeadError::Authentication));
        }
    }
}
