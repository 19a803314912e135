//! Login throttling, per account and per client address: governor counts failed attempts, and
//! a key that exhausted its allowance is refused with 429 until its next cell is due. Unknown
//! accounts are throttled exactly like known ones, so the answer tells nothing.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use std::collections::HashMap;

pub struct LoginThrottle {
    accounts: DefaultKeyedRateLimiter<String>,
    addresses: DefaultKeyedRateLimiter<IpAddr>,
    locked_accounts: Mutex<HashMap<String, Instant>>,
    locked_addresses: Mutex<HashMap<IpAddr, Instant>>,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("at least one"))
}

impl LoginThrottle {
    pub fn new(failures_per_account_per_minute: u32, failures_per_address_per_minute: u32) -> Self {
        LoginThrottle {
            accounts: RateLimiter::keyed(per_minute(failures_per_account_per_minute)),
            addresses: RateLimiter::keyed(per_minute(failures_per_address_per_minute)),
            locked_accounts: Mutex::new(HashMap::new()),
            locked_addresses: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds to wait if this attempt must be refused before any password work.
    pub fn refused(&self, username: &str, address: Option<IpAddr>) -> Option<u64> {
        let now = Instant::now();
        let wait = |until: Option<&Instant>| until.filter(|u| **u > now).map(|u| (*u - now).as_secs().max(1));
        let a = wait(self.locked_accounts.lock().get(username));
        let b = address.and_then(|ip| wait(self.locked_addresses.lock().get(&ip)));
        a.max(b)
    }

    /// Counts a failed attempt; once a key's allowance is spent it is locked until refilled.
    pub fn failed(&self, username: &str, address: Option<IpAddr>) {
        let clock = DefaultClock::default();
        let lock_for = |not_until: governor::NotUntil<_>| -> Duration { not_until.wait_time_from(clock.now()) };
        if let Err(not_until) = self.accounts.check_key(&username.to_string()) {
            let until = Instant::now() + lock_for(not_until);
            let mut locked = self.locked_accounts.lock();
            locked.retain(|_, u| *u > Instant::now());
            locked.insert(username.to_string(), until);
        }
        if let Some(ip) = address {
            if let Err(not_until) = self.addresses.check_key(&ip) {
                let until = Instant::now() + lock_for(not_until);
                let mut locked = self.locked_addresses.lock();
                locked.retain(|_, u| *u > Instant::now());
                locked.insert(ip, until);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_lock_the_account_for_any_address() {
        let t = LoginThrottle::new(3, 1000);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.refused("bob", Some(ip)), None);
            t.failed("bob", Some(ip));
        }
        assert_eq!(t.refused("bob", Some(ip)), None, "the allowance is 3 failures");
        t.failed("bob", Some(ip));
        assert!(t.refused("bob", Some(ip)).unwrap() >= 1);
        assert!(t.refused("bob", None).is_some());
        assert_eq!(t.refused("alice", Some(ip)), None);
    }

    #[test]
    fn an_address_spraying_accounts_is_locked() {
        let t = LoginThrottle::new(1000, 2);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        for i in 0..3 {
            t.failed(&format!("user{i}"), Some(ip));
        }
        assert!(t.refused("someone_else", Some(ip)).is_some());
        assert_eq!(t.refused("someone_else", Some("127.0.0.3".parse().unwrap())), None);
    }
}
