//! Login throttling, per account and per client address: governor counts failed attempts, and
//! a key that exhausted its allowance is refused with 429 until its next cell is due. Unknown
//! accounts are throttled exactly like known ones, so the answer tells nothing.
//!
//! An attempt is judged, checked and counted in its keys' turn ([`LoginThrottle::turn`]): the
//! password check takes tens of milliseconds, and attempts sent side by side would otherwise
//! all pass the judgement before the first failure is counted, each guess checked however
//! many the allowance is.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;
use std::collections::HashMap;

/// A keyed limiter whose positive answers tell how much allowance is left, so a key is locked
/// as soon as its allowance is spent, not one (unchecked) attempt later.
type Limiter<K> =
    RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// Keys kept by a limiter before the ones whose allowance has refilled are forgotten.
const RETAIN_ABOVE: usize = 10_000;

pub struct LoginThrottle {
    accounts: Limiter<String>,
    addresses: Limiter<IpAddr>,
    locked_accounts: Mutex<HashMap<String, Instant>>,
    locked_addresses: Mutex<HashMap<IpAddr, Instant>>,
    account_turns: Turns<String>,
    address_turns: Turns<IpAddr>,
}

/// The turn of one attempt: no other attempt on its account or from its address is judged
/// until it is dropped.
pub struct Turn<'a> {
    _account: KeyTurn<'a, String>,
    _address: Option<KeyTurn<'a, IpAddr>>,
}

/// Why no turn was given: too many attempts wait already, or the wait was too long. Answered
/// as the hashing pool's own refusal is, 503 with Retry-After.
#[derive(Debug, PartialEq, Eq)]
pub struct Crowded;

/// Keys with attempts waiting for or holding a turn, beyond which attempts on other keys are
/// refused.
const MOST_WAITING: usize = 4096;

/// The longest an attempt waits for its turn.
const LONGEST_WAIT: Duration = Duration::from_secs(10);

/// One queue per key, for the attempts on it to take their turns; a key's queue lives while an
/// attempt holds or waits on it.
struct Turns<K> {
    queues: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

/// One attempt's place in one key's queue: waiting until `held` is set, then holding it.
struct KeyTurn<'a, K: Eq + Hash> {
    turns: &'a Turns<K>,
    key: K,
    /// Taken (dropped) only under the map's lock, when the place is left.
    queue: Option<Arc<tokio::sync::Mutex<()>>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> Turns<K> {
    fn new() -> Self {
        Turns {
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Joins `key`'s queue (refused when `MOST_WAITING` keys have attempts queued).
    fn join(&self, key: &K) -> Result<KeyTurn<'_, K>, Crowded> {
        let mut queues = self.queues.lock();
        if queues.len() >= MOST_WAITING && !queues.contains_key(key) {
            // Only the map's copy left: no attempt holds or waits on it.
            queues.retain(|_, queue| Arc::strong_count(queue) > 1);
            if queues.len() >= MOST_WAITING {
                return Err(Crowded);
            }
        }
        let queue = queues.entry(key.clone()).or_default().clone();
        Ok(KeyTurn {
            turns: self,
            key: key.clone(),
            queue: Some(queue),
            held: None,
        })
    }
}

impl<K: Eq + Hash> KeyTurn<'_, K> {
    async fn wait(&mut self) {
        if let Some(queue) = &self.queue {
            self.held = Some(queue.clone().lock_owned().await);
        }
    }
}

impl<K: Eq + Hash> Drop for KeyTurn<'_, K> {
    /// Leaves the queue, and forgets it when no other attempt holds or waits on it (also when
    /// the attempt was dropped while waiting). Done under the map's lock, so that of two
    /// places left at once, the last sees itself the last.
    fn drop(&mut self) {
        let mut queues = self.turns.queues.lock();
        drop(self.held.take());
        drop(self.queue.take());
        if queues
            .get(&self.key)
            .is_some_and(|queue| Arc::strong_count(queue) == 1)
        {
            queues.remove(&self.key);
        }
    }
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("at least one"))
}

impl LoginThrottle {
    pub fn new(failures_per_account_per_minute: u32, failures_per_address_per_minute: u32) -> Self {
        LoginThrottle {
            accounts: RateLimiter::keyed(per_minute(failures_per_account_per_minute))
                .with_middleware(),
            addresses: RateLimiter::keyed(per_minute(failures_per_address_per_minute))
                .with_middleware(),
            locked_accounts: Mutex::new(HashMap::new()),
            locked_addresses: Mutex::new(HashMap::new()),
            account_turns: Turns::new(),
            address_turns: Turns::new(),
        }
    }

    /// Waits for the turn of an attempt on `username` from `address`: hold it from
    /// [`LoginThrottle::refused`] through the password check to [`LoginThrottle::failed`], so
    /// that attempts on one account, or from one address, are judged one after the other,
    /// each knowing the failures before it. The account's turn is taken first, always, so two
    /// attempts never wait on each other in a circle. A key already locked should be refused
    /// before its turn is waited for.
    ///
    /// # Errors
    ///
    /// [`Crowded`] when too many attempts wait already, or the turn did not come within
    /// `LONGEST_WAIT`.
    pub async fn turn(&self, username: &str, address: Option<IpAddr>) -> Result<Turn<'_>, Crowded> {
        let mut account = self.account_turns.join(&username.to_string())?;
        let mut address = match address {
            Some(ip) => Some(self.address_turns.join(&ip)?),
            None => None,
        };
        let waited = tokio::time::timeout(LONGEST_WAIT, async {
            account.wait().await;
            if let Some(address) = &mut address {
                address.wait().await;
            }
        })
        .await;
        waited.map_err(|_| Crowded)?;
        Ok(Turn {
            _account: account,
            _address: address,
        })
    }

    /// Seconds to wait if this attempt must be refused before any password work.
    pub fn refused(&self, username: &str, address: Option<IpAddr>) -> Option<u64> {
        let now = Instant::now();
        // Rounded up: a client that waits Retry-After seconds finds the lock gone.
        let wait = |until: Option<&Instant>| {
            until
                .filter(|u| **u > now)
                .map(|u| ((*u - now).as_millis().div_ceil(1000) as u64).max(1))
        };
        let a = wait(self.locked_accounts.lock().get(username));
        let b = address.and_then(|ip| wait(self.locked_addresses.lock().get(&ip)));
        a.max(b)
    }

    /// Counts a failed attempt; once a key's allowance is spent it is locked until refilled.
    pub fn failed(&self, username: &str, address: Option<IpAddr>) {
        if let Some(lock) = spend(&self.accounts, &username.to_string()) {
            let until = Instant::now() + lock;
            let mut locked = self.locked_accounts.lock();
            locked.retain(|_, u| *u > Instant::now());
            locked.insert(username.to_string(), until);
        }
        if let Some(ip) = address {
            if let Some(lock) = spend(&self.addresses, &ip) {
                let until = Instant::now() + lock;
                let mut locked = self.locked_addresses.lock();
                locked.retain(|_, u| *u > Instant::now());
                locked.insert(ip, until);
            }
        }
    }
}

/// Takes one cell of `key`'s allowance; returns how long the key must be locked when the
/// allowance is now spent (this was its last cell) or was spent already.
fn spend<K: Clone + Eq + Hash>(limiter: &Limiter<K>, key: &K) -> Option<Duration> {
    // Every username tried is a key: forget the refilled ones so a spray cannot grow memory.
    if limiter.len() > RETAIN_ABOVE {
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
    let clock = DefaultClock::default();
    match limiter.check_key(key) {
        Ok(state) if state.remaining_burst_capacity() > 0 => None,
        // The last cell: a refused check does not change the state, it only says when the next
        // cell is due.
        Ok(_) => limiter
            .check_key(key)
            .err()
            .map(|not_until| not_until.wait_time_from(clock.now())),
        Err(not_until) => Some(not_until.wait_time_from(clock.now())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_on_one_key_are_one_at_a_time_and_leave_no_queue_behind() {
        let t = LoginThrottle::new(5, 30);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let first = t.turn("bob", Some(ip)).await.unwrap();
        // Another attempt on the account waits; one on another account from another address
        // does not.
        let waiting = tokio::time::timeout(Duration::from_millis(50), t.turn("bob", None));
        assert!(waiting.await.is_err(), "two turns on bob at once");
        let other = t.turn("alice", Some("127.0.0.10".parse().unwrap())).await;
        assert!(other.is_ok());
        drop(other);
        // The attempt dropped while waiting left its queue too.
        drop(first);
        assert!(t.account_turns.queues.lock().is_empty());
        assert!(t.address_turns.queues.lock().is_empty());
        let again = t.turn("bob", Some(ip)).await;
        assert!(again.is_ok(), "bob's turn came once the first was done");
    }

    #[tokio::test]
    async fn too_many_attempts_waiting_are_refused() {
        let t = LoginThrottle::new(5, 30);
        let held: Vec<_> = (0..MOST_WAITING)
            .map(|i| t.account_turns.join(&format!("user{i}")).unwrap())
            .collect();
        assert_eq!(t.turn("one_more", None).await.err(), Some(Crowded));
        // A key already queued may still queue.
        assert!(t.account_turns.join(&"user0".to_string()).is_ok());
        drop(held);
        assert!(t.turn("one_more", None).await.is_ok());
    }

    #[test]
    fn repeated_failures_lock_the_account_for_any_address() {
        let t = LoginThrottle::new(3, 1000);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(
                t.refused("bob", Some(ip)),
                None,
                "the allowance is 3 failures"
            );
            t.failed("bob", Some(ip));
        }
        // No fourth guess within the minute.
        let wait = t.refused("bob", Some(ip)).unwrap();
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(t.refused("bob", None).is_some());
        assert_eq!(t.refused("alice", Some(ip)), None);
    }

    #[test]
    fn an_address_spraying_accounts_is_locked() {
        let t = LoginThrottle::new(1000, 2);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        for i in 0..2 {
            assert_eq!(t.refused(&format!("user{i}"), Some(ip)), None);
            t.failed(&format!("user{i}"), Some(ip));
        }
        assert!(t.refused("someone_else", Some(ip)).is_some());
        assert_eq!(
            t.refused("someone_else", Some("127.0.0.3".parse().unwrap())),
            None
        );
    }

    #[test]
    fn the_sustained_rate_is_the_configured_one() {
        // 60 per minute: one cell a second. Spending the burst locks for about a second, and
        // the refilled cell is the last one again, so every further failure locks at once.
        let t = LoginThrottle::new(60, 100_000);
        for _ in 0..60 {
            assert_eq!(t.refused("carol", None), None);
            t.failed("carol", None);
        }
        assert_eq!(t.refused("carol", None), Some(1));
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(t.refused("carol", None), None);
        t.failed("carol", None);
        assert!(
            t.refused("carol", None).is_some(),
            "one failure per refilled cell, not two"
        );
    }
}
