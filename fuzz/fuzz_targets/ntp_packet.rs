//! Every NTP datagram either side can receive: the server's request parser
//! and the client's reply check never panic; a request that parses gets a
//! reply (and a kiss) no larger than itself, which the client side reads
//! back as an answer to it; header and timestamps round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use service::ntp::{self, Header, NtpTimestamp, Reply, ServerState};
use service::time::{Nanos, Timestamp};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = Header::read(data) {
        let mut buf = [0u8; ntp::HEADER_LEN];
        header.write(&mut buf);
        assert_eq!(Header::read(&buf), Some(header));
    }
    // The client side, against a cookie taken from the datagram itself
    // (so that the origin check passes and the rest is exercised).
    let cookie = Header::read(data).map_or(NtpTimestamp(1), |h| h.origin);
    if let Ok(Reply::Time { receive, transmit, state }) = ntp::check_reply(data, cookie) {
        assert!(!receive.is_zero() && !transmit.is_zero());
        assert!(state.is_synchronized());
        let _ = state.uncertainty();
    }
    if let Ok(request) = ntp::parse_request(data) {
        assert_eq!(request.len, data.len());
        let state = ServerState {
            leap: ntp::Leap::None,
            stratum: 2,
            precision: -25,
            root_delay: Nanos::from_micros(10),
            root_dispersion: Nanos::from_micros(20),
            reference_id: ntp::RefId::LOCAL,
            reference_time: Timestamp::from_nanos(1_790_000_000_000_000_000),
        };
        let ts = Timestamp::from_nanos(1_795_000_000_000_000_000);
        let mut out = [0u8; 1200];
        let n = ntp::write_reply(request.header.echo(), &state, ts, ts, &mut out);
        assert!(n <= data.len());
        match ntp::check_reply(&out[..n], request.header.transmit) {
            Ok(Reply::Time { receive, .. }) => assert_eq!(receive.to_timestamp(ts), ts),
            other => assert!(request.header.transmit.is_zero(), "{other:?}"),
        }
        let n = ntp::write_kiss(request.header.echo(), ntp::RefId::RATE, &mut out);
        assert!(n <= data.len());
    }
    // Any 8 bytes are a timestamp that round-trips within its era.
    if data.len() >= 16 {
        let raw = u64::from_be_bytes(data[..8].try_into().unwrap_or_default());
        let pivot = i64::from_be_bytes(data[8..16].try_into().unwrap_or_default()) / 4;
        let t = NtpTimestamp(raw).to_timestamp(Timestamp::from_nanos(pivot));
        let back = NtpTimestamp::from_timestamp(t);
        // Equal up to the sub-nanosecond rounding of the fraction.
        assert!(back.0.abs_diff(raw) <= 5 || back.0.abs_diff(raw) >= u64::MAX - 5, "{raw:x} {back:?}");
    }
});
