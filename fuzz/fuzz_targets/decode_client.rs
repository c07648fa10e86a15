//! Every datagram a server can receive: decoding never panics, and what
//! decodes re-encodes to something that decodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use service::auth::{Key, Keys};
use service::wire::{self, DatagramBuf, MAX_DATAGRAM, MAX_DEADLINE};

fuzz_target!(|data: &[u8]| {
    let key = Key::new(7, [0x42; 32]);
    let keys = Keys::single(key.clone());
    for (keys, key) in [(None, None), (Some(&keys), Some(&key))] {
        if let Ok((frame, auth)) = wire::decode_client(data, keys) {
            assert!(data.len() >= wire::MIN_REQUEST_LEN);
            assert_eq!(auth.is_some(), keys.is_some());
            if let wire::ClientFrame::Request { deadline, .. } = &frame {
                assert!(*deadline <= MAX_DEADLINE);
            }
            let mut buf: DatagramBuf = [0; MAX_DATAGRAM];
            let (len, _) = wire::encode_client(&frame, &mut buf, key);
            let (again, _) = wire::decode_client(&buf[..len], keys).expect("re-encoded decodes");
            assert_eq!(again, frame);
        }
    }
});
