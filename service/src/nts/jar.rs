//! The client's cookies: each is spent once (a cookie sent twice would let
//! an observer link the two requests, RFC 8915 §5.7), and every reply
//! brings new ones.

use super::ef::MAX_COOKIES;
use std::collections::VecDeque;

/// Up to [`CookieJar::CAPACITY`] cookies for one NTS server, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CookieJar {
    cookies: VecDeque<Vec<u8>>,
}

impl CookieJar {
    /// Most cookies held: eight, as chrony holds and RFC 8915 suggests.
    pub const CAPACITY: usize = MAX_COOKIES;

    /// An empty jar.
    pub fn new() -> CookieJar {
        CookieJar::default()
    }

    /// A jar filled from an NTS-KE response (the first eight kept).
    pub fn from_cookies(cookies: impl IntoIterator<Item = Vec<u8>>) -> CookieJar {
        let mut jar = CookieJar::new();
        for cookie in cookies.into_iter().take(Self::CAPACITY) {
            jar.add(cookie);
        }
        jar
    }

    /// Takes the oldest cookie for a request: the one most likely to go
    /// stale when the server rotates its keys. It is gone from the jar
    /// whether or not the request is answered.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        self.cookies.pop_front()
    }

    /// Adds a cookie from a reply. When full, the oldest is dropped: newer
    /// cookies outlive older ones.
    pub fn add(&mut self, cookie: Vec<u8>) {
        if self.cookies.len() == Self::CAPACITY {
            self.cookies.pop_front();
        }
        self.cookies.push_back(cookie);
    }

    /// How many placeholders the next request should carry, after
    /// [`CookieJar::take`]: enough to fill the jar again, the request's
    /// own cookie bringing one.
    pub fn placeholders(&self) -> usize {
        (Self::CAPACITY - self.len()).saturating_sub(1)
    }

    /// Cookies held.
    pub fn len(&self) -> usize {
        self.cookies.len()
    }

    /// True when there is none: time for NTS-KE.
    pub fn is_empty(&self) -> bool {
        self.cookies.is_empty()
    }

    /// Forgets every cookie (after an NTS NAK, or new keys).
    pub fn clear(&mut self) {
        self.cookies.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8) -> Vec<u8> {
        vec![n; 4]
    }

    #[test]
    fn cookies_are_spent_oldest_first_and_refilled() {
        let mut jar = CookieJar::from_cookies((0..10).map(c));
        assert_eq!(jar.len(), 8);
        assert_eq!(jar.take(), Some(c(0)));
        // Seven left: the request asks for one back and placeholders for none.
        assert_eq!(jar.placeholders(), 0);
        jar.add(c(20));
        assert_eq!(jar.len(), 8);
        let spent: Vec<_> = std::iter::from_fn(|| jar.take()).collect();
        assert_eq!(spent, [1, 2, 3, 4, 5, 6, 7, 20].map(c));
        assert!(jar.is_empty());
        assert_eq!(jar.take(), None);
    }

    #[test]
    fn an_emptying_jar_asks_for_more() {
        let mut jar = CookieJar::from_cookies([c(1)]);
        assert_eq!(jar.take(), Some(c(1)));
        // Empty after the take: one back with the cookie, seven placeholders.
        assert_eq!(jar.placeholders(), 7);
        for i in 0..8 {
            jar.add(c(i));
        }
        assert_eq!(jar.placeholders(), 0);
    }

    #[test]
    fn a_full_jar_drops_the_oldest() {
        let mut jar = CookieJar::from_cookies((0..8).map(c));
        jar.add(c(9));
        assert_eq!(jar.len(), 8);
        assert_eq!(jar.take(), Some(c(1)));
        jar.clear();
        assert!(jar.is_empty());
    }
}
