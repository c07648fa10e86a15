//! Per-source rate limiting: a token bucket for each client address.
//!
//! The buckets live in a fixed table indexed by a keyed hash of the source
//! (the IPv4 address, or the /64 prefix of an IPv6 one: an attacker owns
//! whole /64s), so memory is the same whatever arrives: 100 000 spoofed
//! addresses cost nothing more than one. A bucket whose slot another
//! source wants is taken over when it has refilled (its owner has been
//! quiet), and otherwise too: two active sources that collide share less
//! well, which is the price of a bounded table; the hash is keyed at random
//! so an attacker cannot aim collisions at a victim.
//!
//! Each datagram costs one token; a bucket holds at most `burst` tokens and
//! refills at `rate` per second. Checked before decoding, so a flood of
//! anything from one source is stopped before it costs more than a lookup.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;

/// How fast one source may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Datagrams per second, sustained. Zero turns limiting off.
    pub rate: u32,
    /// Datagrams allowed at once after a quiet spell.
    pub burst: u32,
}

impl Default for RateLimit {
    /// 100 datagrams per second, bursts of 200: a sync needs about ten,
    /// so an honest client never meets the limit.
    fn default() -> Self {
        RateLimit {
            rate: 100,
            burst: 200,
        }
    }
}

impl RateLimit {
    /// No limit.
    pub const OFF: RateLimit = RateLimit { rate: 0, burst: 0 };
}

/// Tokens are counted in millionths, so that refills of a fraction of a
/// token are not lost.
const SCALE: u64 = 1_000_000;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// The source (IPv4 address or IPv6 /64), 0 when free.
    source: u128,
    /// Tokens, in millionths.
    tokens: u64,
    /// When `tokens` was last brought up to date, in nanoseconds.
    updated: u64,
}

/// The table of buckets.
pub struct Limiter {
    limit: RateLimit,
    buckets: Box<[Bucket]>,
    hasher: RandomState,
}

/// Slots in the table: 2^16 buckets of 32 bytes, 2 MiB.
pub const DEFAULT_SLOTS: usize = 1 << 16;

impl Limiter {
    /// A limiter with `slots` buckets (rounded up to a power of two).
    pub fn new(limit: RateLimit, slots: usize) -> Self {
        let slots = if limit.rate == 0 {
            0
        } else {
            slots.max(1).next_power_of_two()
        };
        Limiter {
            limit,
            buckets: vec![Bucket::default(); slots].into_boxed_slice(),
            hasher: RandomState::new(),
        }
    }

    /// Whether a datagram from `ip` at `now_ns` (any monotonic clock, in
    /// nanoseconds) may pass; takes a token if so.
    pub fn allow(&mut self, ip: IpAddr, now_ns: u64) -> bool {
        if self.limit.rate == 0 {
            return true;
        }
        let source = source_of(ip);
        let index = (self.hasher.hash_one(source) as usize) & (self.buckets.len() - 1);
        let full = u64::from(self.limit.burst.max(1)) * SCALE;
        let rate = u64::from(self.limit.rate);
        let bucket = &mut self.buckets[index];
        let elapsed = now_ns.saturating_sub(bucket.updated);
        // Refill: rate tokens per second, i.e. rate millionths per µs.
        let refilled = bucket
            .tokens
            .saturating_add(elapsed.saturating_mul(rate) / 1_000);
        if bucket.source == 0 {
            // A slot never used: this source's, full.
            *bucket = Bucket {
                source,
                tokens: full,
                updated: now_ns,
            };
        } else {
            bucket.tokens = refilled.min(full);
            bucket.updated = now_ns;
            if bucket.source != source && bucket.tokens == full {
                // Its owner has been quiet long enough: the slot changes hands.
                bucket.source = source;
            }
        }
        if bucket.tokens >= SCALE {
            bucket.tokens -= SCALE;
            true
        } else {
            false
        }
    }

    /// Bytes the table holds.
    pub fn memory(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }
}

/// The key of a source: an IPv4 address (mapped ones included), or the
/// first 64 bits of an IPv6 one; never 0.
fn source_of(ip: IpAddr) -> u128 {
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    match (v4, ip) {
        (Some(v4), _) => (1 << 64) | u128::from(u32::from(v4)),
        (None, IpAddr::V6(v6)) => (2 << 64) | (u128::from(v6) >> 64),
        (None, IpAddr::V4(_)) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut l = Limiter::new(RateLimit { rate: 10, burst: 5 }, 64);
        let a = ip("127.0.0.2");
        let passed = (0..20).filter(|_| l.allow(a, 0)).count();
        assert_eq!(passed, 5);
        // 10 per second: one more token every 100 ms.
        assert!(!l.allow(a, 50 * MS));
        assert!(l.allow(a, 100 * MS));
        assert!(!l.allow(a, 100 * MS));
        // A long silence refills only to the burst.
        let passed = (0..20).filter(|_| l.allow(a, 100_000 * MS)).count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn sources_do_not_share_buckets() {
        let mut l = Limiter::new(RateLimit { rate: 1, burst: 2 }, DEFAULT_SLOTS);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(l.allow(a, 0) && l.allow(a, 0) && !l.allow(a, 0));
        assert!(l.allow(b, 0) && l.allow(b, 0) && !l.allow(b, 0));
    }

    #[test]
    fn ipv6_is_limited_per_64() {
        let mut l = Limiter::new(RateLimit { rate: 1, burst: 2 }, DEFAULT_SLOTS);
        assert!(l.allow(ip("2001:db8:1:2::1"), 0));
        assert!(l.allow(ip("2001:db8:1:2::ffff"), 0));
        assert!(!l.allow(ip("2001:db8:1:2:aaaa::"), 0), "same /64");
        assert!(l.allow(ip("2001:db8:1:3::1"), 0), "another /64");
        // A mapped IPv4 address is that IPv4 address.
        assert!(l.allow(ip("192.0.2.7"), 0));
        assert!(l.allow(ip("::ffff:192.0.2.7"), 0));
        assert!(!l.allow(ip("192.0.2.7"), 0));
    }

    #[test]
    fn colliding_sources_share_a_bucket_and_never_escape_it() {
        // One slot: every source collides.
        let mut l = Limiter::new(RateLimit { rate: 1, burst: 4 }, 1);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let passed = (0..20)
            .filter(|i| l.allow(if i % 2 == 0 { a } else { b }, 0))
            .count();
        assert_eq!(passed, 4, "alternating sources must not reset the bucket");
        // Once it has refilled, a newcomer may take the slot.
        assert!(l.allow(b, 10_000 * MS));
    }

    #[test]
    fn off_lets_everything_through_and_holds_nothing() {
        let mut l = Limiter::new(RateLimit::OFF, DEFAULT_SLOTS);
        assert!((0..10_000).all(|_| l.allow(ip("127.0.0.1"), 0)));
        assert_eq!(l.memory(), 0);
    }

    #[test]
    fn memory_is_fixed_whatever_the_sources() {
        let mut l = Limiter::new(RateLimit::default(), 1024);
        let before = l.memory();
        for i in 0..100_000u32 {
            l.allow(IpAddr::V4(i.into()), u64::from(i));
        }
        assert_eq!(l.memory(), before);
        assert_eq!(before, 1024 * std::mem::size_of::<Bucket>());
    }
}
