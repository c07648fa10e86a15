//! NTP datagrams with NTS fields, with fixed keys. Raw bytes: neither the
//! server's check nor the client's panics, a NAK goes only to requests
//! that earn one and is never larger than they are. Requests built from
//! the input with the public API (any header, identifier, cookie or
//! placeholder count, and a field of the input's own in front) either
//! round-trip to the same cookies in a reply no larger than the request,
//! or fail cleanly.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use service::ntp::{self, HEADER_LEN};
use service::nts::ef::{self, NtsError, UID_LEN};
use service::nts::{Aead, CookieKeys, Key, MasterKeys};

#[derive(Arbitrary, Debug)]
struct Built {
    header: [u8; HEADER_LEN],
    uid: [u8; UID_LEN],
    /// Our own sealed cookie, or these bytes as a cookie.
    forged_cookie: Option<Vec<u8>>,
    placeholders: u8,
    extra: Option<(u16, Vec<u8>)>,
    nonce: [u8; 16],
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Built(Built),
}

fn keys() -> CookieKeys {
    CookieKeys {
        aead: Aead::AesSivCmac256,
        c2s: Key::from_bytes([1; 32]),
        s2c: Key::from_bytes([2; 32]),
    }
}

/// The server's answer, if any: a reply or a NAK.
fn serve(packet: &[u8], master: &MasterKeys) -> Option<Vec<u8>> {
    let mut out = vec![0u8; 2048];
    match ef::open_request(packet, master) {
        Ok(req) => {
            assert!(req.cookies_wanted >= 1 && req.cookies_wanted <= ef::MAX_COOKIES);
            let cookies: Vec<Vec<u8>> = (0..req.cookies_wanted)
                .map(|_| master.seal(&req.keys, &[7; 16]))
                .collect();
            out[..HEADER_LEN].copy_from_slice(&packet[..HEADER_LEN]);
            out[0] = (out[0] & !7) | 4;
            let len = ef::write_reply(&mut out, HEADER_LEN, &req, &cookies, &[9; 16])
                .expect("the cookies asked for always fit");
            assert!(len <= packet.len());
            out.truncate(len);
            Some(out)
        }
        Err(e) if e.nak() => {
            let len = ef::write_nak(&mut out, packet).expect("a NAK-worthy request has a uid");
            assert!(len <= packet.len());
            out.truncate(len);
            Some(out)
        }
        Err(_) => None,
    }
}

fuzz_target!(|input: Input| {
    let master = MasterKeys::new(3, Key::from_bytes([0x42; 32]));
    match input {
        Input::Raw(bytes) => {
            let _ = serve(&bytes, &master);
            let _ = ef::check_reply(&bytes, &[0x11; UID_LEN], &keys().s2c);
            let mut out = [0u8; 2048];
            let _ = ef::write_nak(&mut out, &bytes);
        }
        Input::Built(b) => {
            let mut out = vec![0u8; 2048];
            out[..HEADER_LEN].copy_from_slice(&b.header);
            let mut start = HEADER_LEN;
            if let Some((kind, value)) = &b.extra {
                match ntp::write_field(&mut out[start..], *kind, value) {
                    Some(n) if n < 600 => start += n,
                    _ => return,
                }
            }
            let cookie = b
                .forged_cookie
                .unwrap_or_else(|| master.seal(&keys(), &[5; 16]));
            let placeholders = usize::from(b.placeholders % 9);
            let c2s = keys().c2s;
            let Ok(len) = ef::write_request(
                &mut out,
                start,
                &b.uid,
                &cookie,
                placeholders,
                &c2s,
                &b.nonce,
            ) else {
                return;
            };
            let packet = &out[..len];
            // The input's own field may be one more placeholder.
            let wanted = ef::open_request(packet, &master).map(|r| r.cookies_wanted);
            match serve(packet, &master) {
                Some(reply) => match ef::check_reply(&reply, &b.uid, &keys().s2c) {
                    Ok(cookies) => {
                        assert_eq!(Ok(cookies.len()), wanted);
                        assert!(cookies.len() > placeholders);
                        for c in &cookies {
                            assert_eq!(master.open(c), Ok(keys()));
                        }
                    }
                    Err(NtsError::Nak) => assert!(master.open(&cookie).is_err()),
                    // The header bytes came from the input (mode, version).
                    Err(NtsError::Packet(_)) => {}
                    Err(e) => panic!("our own reply refused: {e}"),
                },
                None => assert!(ef::open_request(packet, &master).is_err()),
            }
        }
    }
});
