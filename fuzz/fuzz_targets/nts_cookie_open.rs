//! Cookies from the network: opening arbitrary bytes never panics and
//! never succeeds without the key; what is sealed opens to the same keys
//! under every key still held, and not after it is rotated out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use service::nts::cookie::DEFAULT_KEEP;
use service::nts::{Aead, CookieKeys, Key, MasterKeys};

fuzz_target!(|data: &[u8]| {
    let mut master = MasterKeys::new(u32::MAX - 1, Key::from_bytes([0x42; 32]));
    master.rotate(Key::from_bytes([0x43; 32]));
    assert!(master.open(data).is_err(), "opened a cookie nobody sealed");
    if let Some((material, rest)) = data.split_first_chunk::<80>() {
        let keys = CookieKeys {
            aead: Aead::AesSivCmac256,
            c2s: Key::from_slice(&material[..32]).expect("32 bytes"),
            s2c: Key::from_slice(&material[32..64]).expect("32 bytes"),
        };
        let nonce: [u8; 16] = material[64..].try_into().expect("16 bytes");
        let cookie = master.seal(&keys, &nonce);
        // Held through DEFAULT_KEEP - 1 rotations, gone after one more.
        for _ in 0..DEFAULT_KEEP {
            assert_eq!(master.open(&cookie), Ok(keys.clone()));
            master.rotate(Key::from_slice(&[rest.len() as u8; 32]).expect("32 bytes"));
        }
        assert!(master.open(&cookie).is_err());
    }
});
