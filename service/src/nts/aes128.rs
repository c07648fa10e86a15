//! AES-128 encryption of single blocks, for AES-SIV's CMAC chains and CTR.
//!
//! CMAC is a chain: each block's encryption waits for the one before, so
//! what a block costs is the latency of one encryption plus whatever the
//! call around it costs. Through the `aes` crate's `BlockCipherEncrypt`
//! (its runtime dispatch and block-closure machinery) one chained block
//! costs about 45 ns on this project's machines; the ten AES-NI rounds
//! themselves take about 17. An NTS request needs some forty chained
//! blocks, so on x86-64 with AES-NI this module runs the rounds itself
//! (`_mm_aesenc_si128`, the key expanded with `_mm_aeskeygenassist_si128`),
//! and elsewhere falls back to the crate. The tests hold both to each
//! other and to FIPS-197's vector.

use aes::cipher::{BlockCipherEncrypt, KeyInit};

/// One 16-byte block.
pub type Block = [u8; 16];

/// An expanded AES-128 encryption key.
pub enum Aes128 {
    /// The rounds run with AES-NI (detected at run time).
    #[cfg(target_arch = "x86_64")]
    Ni(ni::Keys),
    /// The `aes` crate's implementation.
    Crate(Box<aes::Aes128Enc>),
}

impl Aes128 {
    /// `key` expanded, for AES-NI when this CPU has it.
    pub fn new(key: &[u8; 16]) -> Aes128 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("aes") {
            // SAFETY: the CPU has AES-NI (and SSE2, which x86-64 always has).
            return Aes128::Ni(unsafe { ni::Keys::expand(key) });
        }
        Aes128::with_crate(key)
    }

    /// `key` expanded by the `aes` crate (the fallback, and the tests'
    /// reference).
    pub fn with_crate(key: &[u8; 16]) -> Aes128 {
        Aes128::Crate(Box::new(aes::Aes128Enc::new(key.into())))
    }

    /// One block encrypted.
    #[inline]
    pub fn encrypt(&self, block: Block) -> Block {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Ni` keys exist only where AES-NI was detected.
            Aes128::Ni(keys) => unsafe { keys.encrypt(block) },
            Aes128::Crate(aes) => {
                let mut b = aes::Block::from(block);
                aes.encrypt_block(&mut b);
                b.into()
            }
        }
    }

    /// `N` blocks encrypted side by side: the rounds of independent blocks
    /// overlap in the pipeline, so a few cost little more than one.
    #[inline]
    pub fn encrypt_n<const N: usize>(&self, blocks: &mut [Block; N]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `encrypt`.
            Aes128::Ni(keys) => unsafe { keys.encrypt_n(blocks) },
            Aes128::Crate(aes) => {
                for block in blocks {
                    *block = {
                        let mut b = aes::Block::from(*block);
                        aes.encrypt_block(&mut b);
                        b.into()
                    };
                }
            }
        }
    }

    /// Up to eight blocks encrypted side by side (CTR's keystream, CMAC
    /// chains of several messages).
    #[inline]
    pub fn encrypt8(&self, blocks: &mut [Block]) {
        /// Encrypts `blocks` (exactly `N` of them) with [`Aes128::encrypt_n`].
        #[inline(always)]
        fn fixed<const N: usize>(aes: &Aes128, blocks: &mut [Block]) {
            if let Ok(b) = <&mut [Block; N]>::try_from(blocks) {
                aes.encrypt_n(b);
            }
        }
        match blocks.len() {
            0 => {}
            1 => fixed::<1>(self, blocks),
            2 => fixed::<2>(self, blocks),
            3 => fixed::<3>(self, blocks),
            4 => fixed::<4>(self, blocks),
            5 => fixed::<5>(self, blocks),
            6 => fixed::<6>(self, blocks),
            7 => fixed::<7>(self, blocks),
            _ => {
                let (head, rest) = blocks.split_at_mut(8);
                fixed::<8>(self, head);
                self.encrypt8(rest);
            }
        }
    }
}

impl Drop for Aes128 {
    fn drop(&mut self) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Aes128::Ni(keys) => keys.wipe(),
            // The crate's key schedule wipes itself (its `zeroize` feature).
            Aes128::Crate(_) => {}
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod ni {
    //! The AES-NI rounds. Every function here needs the CPU to have AES-NI;
    //! [`super::Aes128::new`] checks before it makes [`Keys`].

    use super::Block;
    use std::arch::x86_64::*;

    /// The eleven round keys of AES-128.
    pub struct Keys([__m128i; 11]);

    impl Keys {
        /// FIPS-197's key expansion, one `aeskeygenassist` per round.
        ///
        /// # Safety
        /// The CPU must have AES-NI.
        #[target_feature(enable = "aes")]
        pub unsafe fn expand(key: &[u8; 16]) -> Keys {
            /// The next round key from the last and the assist's output.
            #[target_feature(enable = "sse2")]
            #[inline]
            fn next(prev: __m128i, assist: __m128i) -> __m128i {
                let t = _mm_shuffle_epi32::<0xff>(assist);
                let mut p = prev;
                p = _mm_xor_si128(p, _mm_slli_si128::<4>(p));
                p = _mm_xor_si128(p, _mm_slli_si128::<4>(p));
                p = _mm_xor_si128(p, _mm_slli_si128::<4>(p));
                _mm_xor_si128(p, t)
            }
            // SAFETY: an unaligned load of 16 bytes from a 16-byte array.
            let k0 = unsafe { _mm_loadu_si128(key.as_ptr().cast()) };
            let k1 = next(k0, _mm_aeskeygenassist_si128::<0x01>(k0));
            let k2 = next(k1, _mm_aeskeygenassist_si128::<0x02>(k1));
            let k3 = next(k2, _mm_aeskeygenassist_si128::<0x04>(k2));
            let k4 = next(k3, _mm_aeskeygenassist_si128::<0x08>(k3));
            let k5 = next(k4, _mm_aeskeygenassist_si128::<0x10>(k4));
            let k6 = next(k5, _mm_aeskeygenassist_si128::<0x20>(k5));
            let k7 = next(k6, _mm_aeskeygenassist_si128::<0x40>(k6));
            let k8 = next(k7, _mm_aeskeygenassist_si128::<0x80>(k7));
            let k9 = next(k8, _mm_aeskeygenassist_si128::<0x1b>(k8));
            let k10 = next(k9, _mm_aeskeygenassist_si128::<0x36>(k9));
            Keys([k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10])
        }

        /// # Safety
        /// The CPU must have AES-NI.
        #[target_feature(enable = "aes")]
        #[inline]
        pub unsafe fn encrypt(&self, block: Block) -> Block {
            let k = &self.0;
            // SAFETY: unaligned 16-byte loads and stores of 16-byte arrays.
            unsafe {
                let mut x = _mm_xor_si128(_mm_loadu_si128(block.as_ptr().cast()), k[0]);
                for round in &k[1..10] {
                    x = _mm_aesenc_si128(x, *round);
                }
                x = _mm_aesenclast_si128(x, k[10]);
                let mut out = [0u8; 16];
                _mm_storeu_si128(out.as_mut_ptr().cast(), x);
                out
            }
        }

        /// # Safety
        /// The CPU must have AES-NI.
        #[target_feature(enable = "aes")]
        #[inline]
        pub unsafe fn encrypt_n<const N: usize>(&self, blocks: &mut [Block; N]) {
            let k = &self.0;
            // SAFETY: unaligned 16-byte loads and stores of 16-byte arrays.
            unsafe {
                let mut x: [__m128i; N] = std::array::from_fn(|i| {
                    _mm_xor_si128(_mm_loadu_si128(blocks[i].as_ptr().cast()), k[0])
                });
                for round in &k[1..10] {
                    for xi in &mut x {
                        *xi = _mm_aesenc_si128(*xi, *round);
                    }
                }
                for (block, xi) in blocks.iter_mut().zip(x) {
                    _mm_storeu_si128(block.as_mut_ptr().cast(), _mm_aesenclast_si128(xi, k[10]));
                }
            }
        }

        /// Overwrites the round keys with zeros, in a way the compiler
        /// keeps.
        pub fn wipe(&mut self) {
            for k in &mut self.0 {
                // SAFETY: a volatile store of a valid value into a place
                // this owns.
                unsafe { std::ptr::write_volatile(k, std::mem::zeroed()) };
            }
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fips_197_appendix_c1() {
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let plain: Block = std::array::from_fn(|i| (i as u8) * 0x11);
        let want = [
            0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4,
            0xc5, 0x5a,
        ];
        assert_eq!(Aes128::new(&key).encrypt(plain), want);
        assert_eq!(Aes128::with_crate(&key).encrypt(plain), want);
    }

    #[test]
    fn this_machine_uses_aes_ni() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("aes") {
            assert!(matches!(Aes128::new(&[0; 16]), Aes128::Ni(_)));
        }
    }

    proptest! {
        #[test]
        fn the_rounds_agree_with_the_crate(
            key in any::<[u8; 16]>(),
            blocks in prop::collection::vec(any::<[u8; 16]>(), 0..=20),
        ) {
            let ours = Aes128::new(&key);
            let theirs = Aes128::with_crate(&key);
            for &b in &blocks {
                prop_assert_eq!(ours.encrypt(b), theirs.encrypt(b));
            }
            let mut a = blocks.clone();
            let mut b = blocks.clone();
            ours.encrypt8(&mut a);
            theirs.encrypt8(&mut b);
            prop_assert_eq!(a, b);
        }
    }
}
