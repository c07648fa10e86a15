//! NTS-KE bytes from a peer, split across reads however the input says:
//! the decoder never panics or buffers past its limit, a complete message
//! re-encodes to itself, and both sides digest it. Every server response
//! is itself a well-formed message that a client either accepts with a
//! full set of cookies or refuses for a reason the server gave.
#![no_main]

use libfuzzer_sys::fuzz_target;
use service::nts::ke::{self, Decoded, Decoder, KeError, Message, ServerOptions};
use service::nts::{Aead, CookieKeys, Key, MasterKeys};

fuzz_target!(|data: &[u8]| {
    // The first byte sets the read size (1 to 256 bytes at a time).
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let master = MasterKeys::new(1, Key::from_bytes([0x42; 32]));
    let keys = |aead| {
        Some(CookieKeys {
            aead,
            c2s: Key::from_bytes([1; 32]),
            s2c: Key::from_bytes([2; 32]),
        })
    };
    let mut decoder = Decoder::with_limit(4096);
    for chunk in bytes.chunks(usize::from(step) + 1) {
        match decoder.feed(chunk) {
            Ok(Decoded::NeedMore) => {}
            Ok(Decoded::Complete(message)) => {
                let encoded = message.encode().expect("decoded records encode");
                assert_eq!(Message::decode(&encoded), Ok(message.clone()));
                let _ = ke::parse_response(&message, &Aead::ALL);
                let response = ke::respond(&message, keys, &master, &ServerOptions::default());
                let response = Message::decode(&response).expect("responses are well-formed");
                match ke::parse_response(&response, &Aead::ALL) {
                    Ok(ok) => assert_eq!(ok.cookies.len(), ke::COOKIES_PER_RESPONSE),
                    Err(e) => assert!(matches!(
                        e,
                        KeError::ServerError(_) | KeError::NoCommonProtocol | KeError::NoCommonAead
                    )),
                }
                return;
            }
            Err(_) => return,
        }
    }
});
