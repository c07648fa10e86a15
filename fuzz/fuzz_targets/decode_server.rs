//! Every datagram a client can receive: decoding never panics, and what
//! decodes re-encodes to the same (given room: a client accepts replies up
//! to the datagram limit, servers send at most MAX_REPLY_LEN, cutting error
//! details to fit, which the first fuzzing run caught this target
//! forgetting).
#![no_main]

use libfuzzer_sys::fuzz_target;
use service::auth::{Key, TRAILER_LEN};
use service::wire::{self, MAX_REPLY_LEN};

fuzz_target!(|data: &[u8]| {
    let key = Key::new(7, [0x42; 32]);
    let request_tag = [0x17; 16];
    if let Ok(frame) = wire::decode_server(data, None, |_| None) {
        let mut buf = [0u8; 1200];
        let len = wire::encode_server(&frame, &mut buf, None).expect("what decoded fits");
        assert_eq!(
            wire::decode_server(&buf[..len], None, |_| None).ok(),
            Some(frame.clone())
        );
        // Cut to a server's limit, a reply still decodes.
        if let Some(len) = wire::encode_server(&frame, &mut buf[..MAX_REPLY_LEN], None) {
            assert!(len <= MAX_REPLY_LEN);
            assert!(wire::decode_server(&buf[..len], None, |_| None).is_ok());
        }
    }
    // A key whose id is what the header bytes read as: the trailer of a
    // short datagram can overlap the header.
    let odd = Key::new(u32::from_le_bytes([b'c', b'f', 1, 0x83]), [0x42; 32]);
    let _ = wire::decode_server(data, Some(&odd), |_| Some(request_tag));
    if let Ok(frame) = wire::decode_server(data, Some(&key), |_| Some(request_tag)) {
        // Only a holder of the key can make a reply that verifies.
        let mut buf = [0u8; 1200];
        let len = wire::encode_server(
            &frame,
            &mut buf[..MAX_REPLY_LEN + TRAILER_LEN],
            Some((&key, &request_tag)),
        );
        if let Some(len) = len {
            assert!(wire::decode_server(&buf[..len], Some(&key), |_| Some(request_tag)).is_ok());
        }
    }
});
