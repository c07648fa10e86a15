//! The clock math on timestamps an attacker chose (ts2 and ts3 come from
//! the network): never panics, and every estimate is inside its interval.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use service::sync::{self, Estimator, NowExchange, Sample, SyncParams};
use service::{Nanos, Timestamp};

#[derive(Arbitrary, Debug)]
struct Input {
    samples: Vec<[i64; 4]>,
    now: Option<[i64; 3]>,
    min_transfer: i64,
    ppm: u32,
}

fuzz_target!(|input: Input| {
    let t = Timestamp::from_nanos;
    let samples: Vec<Sample> = input
        .samples
        .iter()
        .take(64)
        .filter_map(|s| Sample::new(t(s[0]), t(s[1]), t(s[2]), t(s[3])).ok())
        .collect();
    let now = input
        .now
        .and_then(|n| NowExchange::new(t(n[0]), t(n[1]), t(n[2])).ok());
    let params = SyncParams {
        min_transfer: Nanos::from_nanos(input.min_transfer.max(0)),
        max_drift_ppm: input.ppm % 1_000_000,
    };
    let _ = sync::mean_delay(&samples);
    for estimator in Estimator::ALL {
        if let Ok(e) = sync::estimate(&samples, now.as_ref(), estimator, &params) {
            assert!(e.low <= e.high);
            assert!(e.bound() >= Nanos::ZERO);
            if estimator != Estimator::MeanDelay {
                assert!(
                    e.low <= e.offset && e.offset <= e.high,
                    "{estimator}: {e:?}"
                );
            }
        }
    }
});
