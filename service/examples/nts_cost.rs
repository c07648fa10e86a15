//! What NTS costs a server per request, step by step, on this machine:
//! the cookie opened, the request checked (both in `ef::open_request`), a
//! fresh cookie sealed, the reply sealed; beside one AES-SIV operation on
//! the sizes involved.
//!
//! ```text
//! cargo run --release -p service --example nts_cost
//! ```

use service::ntp::{self, HEADER_LEN, NtpTimestamp};
use service::nts::aead::{self, NONCE_LEN};
use service::nts::{Aead, CookieKeys, Key, MasterKeys, ef};
use std::hint::black_box;
use std::time::Instant;

const ROUNDS: u32 = 200_000;

fn time(name: &str, mut f: impl FnMut()) -> f64 {
    for _ in 0..ROUNDS / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..ROUNDS {
        f();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
    println!("{name:<44} {ns:>8.0} ns");
    ns
}

fn main() {
    let master = MasterKeys::generate();
    let keys = CookieKeys {
        aead: Aead::AesSivCmac256,
        c2s: Key::generate(),
        s2c: Key::generate(),
    };
    let cookie = master.seal(&keys, &rand::random());
    let uid: [u8; ef::UID_LEN] = rand::random();
    let mut request = vec![0u8; 1200];
    ntp::write_request(NtpTimestamp(7), 0, &mut request);
    let len = ef::write_request(
        &mut request,
        HEADER_LEN,
        &uid,
        &cookie,
        0,
        &keys.c2s,
        &rand::random(),
    )
    .expect("request");
    request.truncate(len);
    println!(
        "request {} bytes, cookie {} bytes",
        request.len(),
        cookie.len()
    );

    let open = time("ef::open_request (cookie + authenticator)", || {
        black_box(ef::open_request(black_box(&request), &master).expect("opens"));
    });
    let opened = ef::open_request(&request, &master).expect("opens");
    let seal_cookie = time("MasterKeys::seal (a fresh cookie)", || {
        black_box(master.seal(&opened.keys, &rand::random()));
    });
    let fresh = vec![master.seal(&opened.keys, &rand::random())];
    let mut out = vec![0u8; 1200];
    let reply = time("ef::write_reply (the reply sealed)", || {
        black_box(
            ef::write_reply(&mut out, HEADER_LEN, &opened, &fresh, &rand::random()).expect("fits"),
        );
    });
    println!(
        "{:<44} {:>8.0} ns",
        "the server's NTS work per request",
        open + seal_cookie + reply
    );

    let key = Key::generate();
    let nonce = [1u8; NONCE_LEN];
    let mut sealed = [0u8; 256];
    for size in [0usize, 68, 104, 240] {
        let plain = vec![3u8; size];
        time(&format!("aead::seal, {size} bytes of plaintext"), || {
            black_box(
                aead::seal(&key, &nonce, &request[..HEADER_LEN], &plain, &mut sealed)
                    .expect("fits"),
            );
        });
    }
    // The generic `aes-siv` crate on the same inputs: what aead.rs
    // replaced, measured in the same run.
    for size in [0usize, 68, 104, 240] {
        use aes_siv::KeyInit;
        let plain = vec![3u8; size];
        let mut buf = plain.clone();
        time(&format!("aes-siv crate seal, {size} bytes"), || {
            let mut siv = aes_siv::siv::Aes128Siv::new(&(*key.as_bytes()).into());
            buf.copy_from_slice(&plain);
            black_box(
                siv.encrypt_inout_detached(
                    [&request[..HEADER_LEN], &nonce[..]],
                    (&mut buf[..]).into(),
                )
                .expect("seals"),
            );
        });
    }
    time("rand::random::<[u8; 16]>()", || {
        black_box(rand::random::<[u8; NONCE_LEN]>());
    });
}
