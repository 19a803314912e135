//! The in-memory quota ledger: for each account key (user, service, method group) it keeps the
//! points committed per local day, the points reserved by calls in flight, and the in-flight
//! slots, and it makes every admission decision atomically under that key's own lock.
//!
//! It owns the quota arithmetic of a proxied call (DESIGN.md, "One proxied call", steps 6 and 9):
//! admission reserves the points and a slot as a [`Lease`]; settling the lease commits the points
//! (upstream answered 2xx) or refunds them, and releases the slot. A lease that is dropped
//! unsettled refunds and releases, and a lease whose release was lost altogether is reaped once
//! its deadline (`lease_ttl` after admission) has passed, so slots can never leak.
//!
//! It leaves to others: which limits apply to a key (config and per-company/per-user overrides),
//! turning a [`Rejection`] into a status and headers (proxy), and durability: the store writer
//! persists the totals [`Ledger::take_dirty`] hands out and feeds saved totals back through
//! [`Ledger::restore`] at start. It knows nothing of HTTP, time zones beyond the fixed UTC offset
//! the caller gives it, or storage.
//!
//! Concurrency: keys are spread over a fixed number of shards, each a read-mostly map from key to
//! that key's account behind its own mutex, so calls for different keys share no lock on the hot
//! path. The accounts with unsaved commits are queued per shard for the same reason.

use foldhash::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

/// Days since 1970-01-01 in a user's local time (see [`local_day`]).
pub type Day = i32;

const SECONDS_PER_DAY: i64 = 86_400;

/// Days of points an account keeps in memory even when its widest date window is shorter, so
/// that a window widened up to a month (config change) still sees the days it newly covers.
pub const MIN_RETAINED_DAYS: u32 = 31;

/// Enough shards that two busy keys rarely share one on a many-core machine; a power of two so
/// picking one compiles to a mask.
const SHARD_COUNT: usize = 64;

/// Retry-After for a call refused only for want of a concurrency slot: a slot usually frees
/// within one call's duration.
const CONCURRENCY_RETRY_AFTER_SECONDS: u64 = 1;

/// The day number of `unix_seconds` for a user whose clock is `utc_offset_hours` ahead of UTC.
pub fn local_day(unix_seconds: i64, utc_offset_hours: i32) -> Day {
    let local_days = local_seconds(unix_seconds, utc_offset_hours).div_euclid(SECONDS_PER_DAY);
    // Only instants millions of years away fall outside `Day`; they clamp to its ends.
    Day::try_from(local_days).unwrap_or(if local_days < 0 { Day::MIN } else { Day::MAX })
}

/// Seconds from `unix_seconds` to the user's next local midnight: 86400 at midnight itself,
/// 1 in the last second of the day.
pub fn seconds_until_local_midnight(unix_seconds: i64, utc_offset_hours: i32) -> u64 {
    let seconds_into_day =
        local_seconds(unix_seconds, utc_offset_hours).rem_euclid(SECONDS_PER_DAY);
    (SECONDS_PER_DAY - seconds_into_day).unsigned_abs()
}

fn local_seconds(unix_seconds: i64, utc_offset_hours: i32) -> i64 {
    unix_seconds.saturating_add(i64::from(utc_offset_hours) * 3_600)
}

/// The user's current local day and how long it still lasts; the ledger needs the latter for
/// the reset times it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Today {
    pub day: Day,
    pub seconds_until_midnight: u64,
}

impl Today {
    pub fn at(unix_seconds: i64, utc_offset_hours: i32) -> Self {
        Today {
            day: local_day(unix_seconds, utc_offset_hours),
            seconds_until_midnight: seconds_until_local_midnight(unix_seconds, utc_offset_hours),
        }
    }
}

/// The effective quotas of one key; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub points_per_request: Option<u64>,
    pub points_per_day: Option<u64>,
    pub points_per_date_window: Option<u64>,
    /// N >= 2: the window is today and the N-1 days before (a value below 1 counts as 1).
    pub date_window_days: u32,
    pub max_concurrent_execution: Option<u32>,
}

/// Why a call was not admitted. Points quotas map to 402, concurrency to 429 with Retry-After.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    PointsPerRequest {
        limit: u64,
        requested: u64,
    },
    PointsPerDay {
        limit: u64,
        used: u64,
        requested: u64,
        reset_seconds: u64,
    },
    /// `reset_seconds`: until enough of the window's use has aged out for `requested` to fit (or,
    /// when it never fits, until all of today's use has aged out).
    PointsPerDateWindow {
        limit: u64,
        used: u64,
        requested: u64,
        window_days: u32,
        reset_seconds: u64,
    },
    Concurrency {
        limit: u32,
        /// Calls of the key in flight: the limit, or more when the limit was lowered under them.
        in_flight: u32,
        retry_after_seconds: u64,
    },
}

/// The tightest points quota of a key, for RateLimit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    /// Local days the quota spans: 1 for `points_per_day`, N for `points_per_date_window`.
    pub window_days: u32,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until `remaining` next grows: the next local midnight for the daily quota, the
    /// midnight that drops the oldest used day out of the date window.
    pub reset_seconds: u64,
}

/// Points of one local day of one account.
#[derive(Debug, Clone, Copy)]
struct DayPoints {
    day: Day,
    committed_points: u64,
    /// Held by leases admitted on this day and not yet settled.
    reserved_points: u64,
}

impl DayPoints {
    fn used_points(&self) -> u64 {
        self.committed_points.saturating_add(self.reserved_points)
    }
}

/// One entry of an account's lease table. The generation changes whenever the slot is freed, so
/// a [`Lease`] that outlived its entry (reaped, then the slot reused) can never touch the new one.
struct LeaseSlot {
    generation: u64,
    live: Option<LiveLease>,
}

struct LiveLease {
    /// `None` when `lease_ttl` is too large to add to an `Instant`: such a lease never expires.
    deadline: Option<Instant>,
    points: u64,
    day: Day,
}

type AccountCell<K> = Mutex<Account<K>>;
/// Accounts with commits the store has not been handed yet.
type UnsavedQueue<K> = Mutex<Vec<Arc<AccountCell<K>>>>;

/// Aligned like a shard so two accounts never share a cache line: calls on different keys
/// would otherwise slow each other down through their neighbouring mutexes.
#[repr(align(128))]
struct Account<K> {
    key: K,
    /// Ascending by day; only days that saw points, at most the retained ones.
    days: Vec<DayPoints>,
    leases: Vec<LeaseSlot>,
    free_lease_slots: Vec<usize>,
    in_flight: u32,
    /// Days whose committed total changed since the store was last handed this account.
    unsaved_days: Vec<Day>,
    queued_as_unsaved: bool,
    /// Grows with the widest date window seen, so pruning never cuts into a window.
    retained_days: u32,
    unsaved_queue: Arc<UnsavedQueue<K>>,
}

impl<K> Account<K> {
    fn new(key: K, unsaved_queue: Arc<UnsavedQueue<K>>) -> Self {
        Account {
            key,
            days: Vec::new(),
            leases: Vec::new(),
            free_lease_slots: Vec::new(),
            in_flight: 0,
            unsaved_days: Vec::new(),
            queued_as_unsaved: false,
            retained_days: MIN_RETAINED_DAYS,
            unsaved_queue,
        }
    }

    fn day_points(&self, day: Day) -> Option<&DayPoints> {
        self.days
            .binary_search_by_key(&day, |entry| entry.day)
            .ok()
            .map(|index| &self.days[index])
    }

    fn day_points_mut(&mut self, day: Day) -> &mut DayPoints {
        let index = match self.days.binary_search_by_key(&day, |entry| entry.day) {
            Ok(index) => index,
            Err(index) => {
                self.days.insert(
                    index,
                    DayPoints {
                        day,
                        committed_points: 0,
                        reserved_points: 0,
                    },
                );
                index
            }
        };
        &mut self.days[index]
    }

    /// This key's day: the user's local day `today`, but never a day before the newest one
    /// already holding points. Without this a user who sets its clock back (a timezone change
    /// through `PUT /account/info`) would start again a day already begun elsewhere, with a
    /// fresh budget; with it, moving the clock back continues the newest day until the local
    /// day catches up. (Moving it forward starts a later day early, once: the day never comes
    /// back, so this gains a user at most the days between its old and new local date.)
    fn day_of(&self, today: Today) -> Today {
        match self.days.iter().rev().find(|entry| entry.used_points() > 0) {
            Some(newest) if newest.day > today.day => {
                let ahead = u64::from(newest.day.abs_diff(today.day));
                Today {
                    day: newest.day,
                    seconds_until_midnight: today
                        .seconds_until_midnight
                        .saturating_add(ahead.saturating_mul(SECONDS_PER_DAY.unsigned_abs())),
                }
            }
            _ => today,
        }
    }

    /// Every quota check, in the documented order; changes nothing.
    fn check(&self, limits: &Limits, points: u64, today: Today) -> Result<(), Rejection> {
        if let Some(limit) = limits.points_per_day {
            let used = self.day_points(today.day).map_or(0, DayPoints::used_points);
            if used.saturating_add(points) > limit {
                return Err(Rejection::PointsPerDay {
                    limit,
                    used,
                    requested: points,
                    reset_seconds: today.seconds_until_midnight,
                });
            }
        }
        if let Some(limit) = limits.points_per_date_window {
            check_date_window(&self.days, limit, limits.date_window_days, points, today)?;
        }
        if let Some(limit) = limits.max_concurrent_execution {
            if self.in_flight >= limit {
                return Err(Rejection::Concurrency {
                    limit,
                    in_flight: self.in_flight,
                    retry_after_seconds: CONCURRENCY_RETRY_AFTER_SECONDS,
                });
            }
        }
        Ok(())
    }

    /// Drops days older than every window this account uses, except those still holding
    /// reservations or waiting to be saved: their totals are still owed to a settle or the store.
    fn prune(&mut self, today: Day, date_window_days: u32) {
        self.retained_days = self.retained_days.max(date_window_days);
        let oldest_kept = i64::from(today) - i64::from(self.retained_days) + 1;
        if self
            .days
            .first()
            .is_none_or(|entry| i64::from(entry.day) >= oldest_kept)
        {
            return;
        }
        let unsaved_days = &self.unsaved_days;
        self.days.retain(|entry| {
            i64::from(entry.day) >= oldest_kept
                || entry.reserved_points > 0
                || unsaved_days.contains(&entry.day)
        });
    }

    fn reserve(&mut self, points: u64, day: Day, deadline: Option<Instant>) -> (usize, u64) {
        let entry = self.day_points_mut(day);
        entry.reserved_points = entry.reserved_points.saturating_add(points);
        self.in_flight += 1;
        let live = LiveLease {
            deadline,
            points,
            day,
        };
        let slot = match self.free_lease_slots.pop() {
            Some(slot) => slot,
            None => {
                self.leases.push(LeaseSlot {
                    generation: 0,
                    live: None,
                });
                self.leases.len() - 1
            }
        };
        let entry = &mut self.leases[slot];
        entry.live = Some(live);
        (slot, entry.generation)
    }

    /// Frees a live lease slot and refunds its reservation; returns the lease it held.
    fn free_slot(&mut self, slot: usize) -> Option<LiveLease> {
        let entry = self.leases.get_mut(slot)?;
        let live = entry.live.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        self.free_lease_slots.push(slot);
        self.in_flight -= 1;
        let day = self.day_points_mut(live.day);
        day.reserved_points = day.reserved_points.saturating_sub(live.points);
        Some(live)
    }

    fn reap(&mut self, now: Instant) -> usize {
        let mut reaped = 0;
        for slot in 0..self.leases.len() {
            let expired = self.leases[slot]
                .live
                .as_ref()
                .and_then(|live| live.deadline)
                .is_some_and(|deadline| deadline <= now);
            if expired && self.free_slot(slot).is_some() {
                reaped += 1;
            }
        }
        reaped
    }

    fn mark_unsaved(&mut self, day: Day, cell: &Arc<AccountCell<K>>) {
        if !self.unsaved_days.contains(&day) {
            self.unsaved_days.push(day);
        }
        if !self.queued_as_unsaved {
            self.queued_as_unsaved = true;
            self.unsaved_queue.lock().push(Arc::clone(cell));
        }
    }
}

/// Sum of committed and reserved points over the days `first..=last`.
fn used_between(days: &[DayPoints], first: i64, last: i64) -> u64 {
    days.iter()
        .rev()
        .skip_while(|entry| i64::from(entry.day) > last)
        .take_while(|entry| i64::from(entry.day) >= first)
        .fold(0, |sum, entry| sum.saturating_add(entry.used_points()))
}

fn check_date_window(
    days: &[DayPoints],
    limit: u64,
    date_window_days: u32,
    points: u64,
    today: Today,
) -> Result<(), Rejection> {
    let window_days = i64::from(date_window_days.max(1));
    let today_day = i64::from(today.day);
    // Points added today also count in the windows of the following days. Those already holding
    // points (a caller whose clock read a little later admitted on the next day) must stay within
    // the limit too, so they are checked as well; later windows hold a subset of these.
    let newest_day = days
        .last()
        .map_or(today_day, |entry| i64::from(entry.day).max(today_day));
    let last_window_end = newest_day.min(today_day + window_days - 1);
    for window_end in today_day..=last_window_end {
        let used = used_between(days, window_end - window_days + 1, window_end);
        if used.saturating_add(points) > limit {
            return Err(Rejection::PointsPerDateWindow {
                limit,
                used,
                requested: points,
                window_days: date_window_days,
                reset_seconds: window_reset_seconds(days, limit, window_days, points, today),
            });
        }
    }
    Ok(())
}

/// Seconds until `points` would fit in the window as today's use ages out, counting reserved
/// points as if they were committed.
fn window_reset_seconds(
    days: &[DayPoints],
    limit: u64,
    window_days: i64,
    points: u64,
    today: Today,
) -> u64 {
    let today_day = i64::from(today.day);
    let midnights = (1..window_days)
        .find(|&midnights| {
            let window_end = today_day + midnights;
            used_between(days, window_end - window_days + 1, window_end).saturating_add(points)
                <= limit
        })
        .unwrap_or(window_days);
    seconds_after_midnights(today, midnights)
}

fn seconds_after_midnights(today: Today, midnights: i64) -> u64 {
    let whole_days = midnights.saturating_sub(1).unsigned_abs();
    today
        .seconds_until_midnight
        .saturating_add(whole_days.saturating_mul(SECONDS_PER_DAY.unsigned_abs()))
}

/// Points of a reservation counted as not used: `(day, points)` of a call whose answer gives
/// them back, still reserved until it settles.
type Returned = Option<(Day, u64)>;

/// What `returned` takes off the use of the days `first..=last`.
fn returned_between(returned: Returned, first: i64, last: i64) -> u64 {
    match returned {
        Some((day, points)) if (first..=last).contains(&i64::from(day)) => points,
        _ => 0,
    }
}

fn remaining_in_day(days: &[DayPoints], limit: u64, today: Today, returned: Returned) -> Remaining {
    let day = i64::from(today.day);
    let used = used_between(days, day, day).saturating_sub(returned_between(returned, day, day));
    Remaining {
        window_days: 1,
        limit,
        remaining: limit.saturating_sub(used),
        reset_seconds: today.seconds_until_midnight,
    }
}

fn remaining_in_window(
    days: &[DayPoints],
    limit: u64,
    date_window_days: u32,
    today: Today,
    returned: Returned,
) -> Remaining {
    let window_days = i64::from(date_window_days.max(1));
    let today_day = i64::from(today.day);
    let first_day = today_day - window_days + 1;
    let used = used_between(days, first_day, today_day)
        .saturating_sub(returned_between(returned, first_day, today_day));
    // With nothing used yet, the answer is when today's use would age out.
    let oldest_used_day = days
        .iter()
        .find(|entry| {
            let day = i64::from(entry.day);
            let returned_here = returned_between(returned, day, day);
            day >= first_day && day <= today_day && entry.used_points() > returned_here
        })
        .map_or(today_day, |entry| i64::from(entry.day));
    Remaining {
        window_days: window_days as u32,
        limit,
        remaining: limit.saturating_sub(used),
        reset_seconds: seconds_after_midnights(today, oldest_used_day - first_day + 1),
    }
}

/// Padded so that locking one shard never invalidates the cache line of its neighbour's lock.
#[repr(align(128))]
struct Shard<K> {
    accounts: RwLock<HashMap<K, Arc<AccountCell<K>>>>,
    unsaved: Arc<UnsavedQueue<K>>,
}

/// The quota state of every key this process has seen since start (see the module docs).
pub struct Ledger<K> {
    shards: Box<[Shard<K>]>,
    shard_hasher: RandomState,
    lease_ttl: Duration,
}

impl<K> Ledger<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// `lease_ttl` should exceed the longest total timeout of any route, so that only leases
    /// whose release was truly lost are reaped.
    pub fn new(lease_ttl: Duration) -> Self {
        let shards = (0..SHARD_COUNT)
            .map(|_| Shard {
                accounts: RwLock::new(HashMap::default()),
                unsaved: Arc::new(Mutex::new(Vec::new())),
            })
            .collect();
        Ledger {
            shards,
            shard_hasher: RandomState::new(),
            lease_ttl,
        }
    }

    fn shard(&self, key: &K) -> &Shard<K> {
        // Truncating the hash is fine: only its low bits pick the shard.
        &self.shards[self.shard_hasher.hash_one(key) as usize % SHARD_COUNT]
    }

    fn existing_account(&self, key: &K) -> Option<Arc<AccountCell<K>>> {
        self.shard(key).accounts.read().get(key).cloned()
    }

    fn account(&self, key: &K) -> Arc<AccountCell<K>> {
        let shard = self.shard(key);
        if let Some(cell) = shard.accounts.read().get(key) {
            return Arc::clone(cell);
        }
        let mut accounts = shard.accounts.write();
        let cell = accounts.entry(key.clone()).or_insert_with(|| {
            Arc::new(Mutex::new(Account::new(
                key.clone(),
                Arc::clone(&shard.unsaved),
            )))
        });
        Arc::clone(cell)
    }

    /// One atomic decision for one key; on success the points are reserved on `today` and a
    /// slot is taken until the returned lease is settled, dropped or reaped. A rejected call
    /// changes nothing.
    ///
    /// The date window counts the points reserved on any of its days, not only today's: a call
    /// admitted yesterday and still running commits to yesterday, which is inside the window.
    pub fn admit(
        &self,
        key: &K,
        limits: &Limits,
        points: u64,
        today: Today,
        now: Instant,
    ) -> Result<Lease<K>, Rejection> {
        if let Some(limit) = limits.points_per_request {
            if points > limit {
                return Err(Rejection::PointsPerRequest {
                    limit,
                    requested: points,
                });
            }
        }
        let cell = self.account(key);
        let mut account = cell.lock();
        let today = account.day_of(today);
        account.check(limits, points, today)?;
        account.prune(today.day, limits.date_window_days);
        let (slot, generation) =
            account.reserve(points, today.day, now.checked_add(self.lease_ttl));
        drop(account);
        Ok(Lease {
            account: Some(cell),
            slot,
            generation,
            points,
            day: today.day,
        })
    }

    /// The tightest of the daily and date-window quotas, counting reserved points as used;
    /// `None` when neither is limited.
    pub fn remaining(&self, key: &K, limits: &Limits, today: Today) -> Option<Remaining> {
        self.remaining_returning(key, limits, today, None)
    }

    /// [`Ledger::remaining`] with the points of `returned` (the day and points of a call still
    /// reserved whose answer gives them back) counted as not used, in each quota whose days
    /// hold it, before the tightest is taken.
    pub fn remaining_returning(
        &self,
        key: &K,
        limits: &Limits,
        today: Today,
        returned: Returned,
    ) -> Option<Remaining> {
        let cell = self.existing_account(key);
        let account = cell.as_ref().map(|cell| cell.lock());
        let days = account
            .as_ref()
            .map_or(&[][..], |account| &account.days[..]);
        let today = account
            .as_ref()
            .map_or(today, |account| account.day_of(today));
        let daily = limits
            .points_per_day
            .map(|limit| remaining_in_day(days, limit, today, returned));
        let window = limits.points_per_date_window.map(|limit| {
            remaining_in_window(days, limit, limits.date_window_days, today, returned)
        });
        match (daily, window) {
            (Some(daily), Some(window)) if window.remaining < daily.remaining => Some(window),
            (Some(daily), _) => Some(daily),
            (None, window) => window,
        }
    }

    /// Adds committed points loaded from the store at start. They are already saved, so they are
    /// not handed out again by [`Ledger::take_dirty`] until a new commit changes that day.
    pub fn restore(&self, key: K, day: Day, committed_points: u64) {
        let cell = self.account(&key);
        let mut account = cell.lock();
        let entry = account.day_points_mut(day);
        entry.committed_points = entry.committed_points.saturating_add(committed_points);
    }

    /// Raises a day's committed points to what the store holds, when the ledger has fewer: for
    /// days a widened date window newly covers, which the ledger may never have loaded. Days it
    /// holds already keep their count (the store only lags it), so nothing is counted twice.
    pub fn restore_at_least(&self, key: K, day: Day, stored_points: u64) {
        let cell = self.account(&key);
        let mut account = cell.lock();
        let entry = account.day_points_mut(day);
        entry.committed_points = entry.committed_points.max(stored_points);
    }

    /// Committed totals changed since the last call: (key, day, total committed that day). The
    /// totals are absolute, so persisting them is an idempotent upsert.
    pub fn take_dirty(&self) -> Vec<(K, Day, u64)> {
        let mut totals = Vec::new();
        for shard in self.shards.iter() {
            // Taken out first so settles on this shard never wait behind the account locks below.
            let queued = std::mem::take(&mut *shard.unsaved.lock());
            for cell in queued {
                let mut account = cell.lock();
                account.queued_as_unsaved = false;
                let unsaved_days = std::mem::take(&mut account.unsaved_days);
                for day in unsaved_days {
                    let committed = account
                        .day_points(day)
                        .map_or(0, |entry| entry.committed_points);
                    totals.push((account.key.clone(), day, committed));
                }
            }
        }
        totals
    }

    /// Frees the slots of leases whose deadline has passed without a settlement and refunds
    /// their points; returns how many. Their late settle, if it ever comes, does nothing.
    pub fn reap_expired(&self, now: Instant) -> usize {
        let mut reaped = 0;
        for shard in self.shards.iter() {
            // Admissions never hold an account lock while taking a shard lock, so this nesting
            // cannot deadlock; it only delays the first call of a new key on this shard.
            let accounts = shard.accounts.read();
            for cell in accounts.values() {
                let mut account = cell.lock();
                if account.in_flight > 0 {
                    reaped += account.reap(now);
                }
            }
        }
        reaped
    }

    pub fn in_flight(&self, key: &K) -> u32 {
        self.existing_account(key)
            .map_or(0, |cell| cell.lock().in_flight)
    }

    pub fn committed(&self, key: &K, day: Day) -> u64 {
        self.existing_account(key).map_or(0, |cell| {
            cell.lock()
                .day_points(day)
                .map_or(0, |entry| entry.committed_points)
        })
    }
}

/// A reservation of points and a concurrency slot.
///
/// `settle(true)` commits the points to the day the call was admitted on, `settle(false)` refunds
/// them; either releases the slot. Dropping an unsettled lease refunds and releases, so a
/// panicking filter or an aborted call never leaks a slot.
///
/// A lease that outlived `lease_ttl` and was reaped is forgotten: its late settle neither frees
/// a slot nor commits points. Committing them then could push the day past its quota, because
/// the reaped reservation may already have been granted to another call; undercharging a call
/// that ran past every timeout is the lesser harm.
pub struct Lease<K> {
    /// `None` once settled, so dropping after settling does nothing.
    account: Option<Arc<AccountCell<K>>>,
    slot: usize,
    generation: u64,
    points: u64,
    day: Day,
}

impl<K> Lease<K> {
    pub fn settle(mut self, commit: bool) {
        self.release(commit);
    }

    pub fn points(&self) -> u64 {
        self.points
    }

    /// The day the points are committed to: the day of admission, even after midnight.
    pub fn day(&self) -> Day {
        self.day
    }

    fn release(&mut self, commit: bool) {
        let Some(cell) = self.account.take() else {
            return;
        };
        let mut account = cell.lock();
        let current = account
            .leases
            .get(self.slot)
            .is_some_and(|entry| entry.generation == self.generation);
        if !current {
            return;
        }
        let Some(live) = account.free_slot(self.slot) else {
            return;
        };
        if commit {
            let entry = account.day_points_mut(live.day);
            entry.committed_points = entry.committed_points.saturating_add(live.points);
            account.mark_unsaved(live.day, &cell);
        }
    }
}

impl<K> Drop for Lease<K> {
    fn drop(&mut self) {
        self.release(false);
    }
}

impl<K> fmt::Debug for Lease<K> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Lease")
            .field("points", &self.points)
            .field("day", &self.day)
            .field("settled", &self.account.is_none())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Barrier;

    use proptest::prelude::*;

    const TTL: Duration = Duration::from_secs(10);
    /// 2024-01-01 as a day number.
    const JAN_1_2024: Day = 19_723;

    fn day(day: Day) -> Today {
        Today {
            day,
            seconds_until_midnight: 3_600,
        }
    }

    fn ledger() -> Ledger<&'static str> {
        Ledger::new(TTL)
    }

    fn daily(points_per_day: u64) -> Limits {
        Limits {
            points_per_day: Some(points_per_day),
            ..Limits::default()
        }
    }

    fn window(points_per_date_window: u64, date_window_days: u32) -> Limits {
        Limits {
            points_per_date_window: Some(points_per_date_window),
            date_window_days,
            ..Limits::default()
        }
    }

    fn commit(ledger: &Ledger<&'static str>, limits: &Limits, points: u64, on: Day) {
        ledger
            .admit(&"k", limits, points, day(on), Instant::now())
            .expect("within quota")
            .settle(true);
    }

    #[test]
    fn local_day_turns_at_local_midnight_in_every_timezone() {
        let utc_midnight = i64::from(JAN_1_2024) * SECONDS_PER_DAY;
        for offset_hours in -12..=12 {
            let local_midnight = utc_midnight - i64::from(offset_hours) * 3_600;
            assert_eq!(local_day(local_midnight, offset_hours), JAN_1_2024);
            assert_eq!(local_day(local_midnight - 1, offset_hours), JAN_1_2024 - 1);
            assert_eq!(
                seconds_until_local_midnight(local_midnight, offset_hours),
                86_400
            );
            assert_eq!(
                seconds_until_local_midnight(local_midnight - 1, offset_hours),
                1
            );
            assert_eq!(
                Today::at(local_midnight + 60, offset_hours),
                Today {
                    day: JAN_1_2024,
                    seconds_until_midnight: 86_340
                }
            );
        }
    }

    #[test]
    fn local_day_of_one_instant_differs_by_timezone() {
        // 2024-01-01T05:00:00Z
        let instant = i64::from(JAN_1_2024) * SECONDS_PER_DAY + 5 * 3_600;
        assert_eq!(local_day(instant, 0), JAN_1_2024);
        assert_eq!(local_day(instant, -5), JAN_1_2024);
        assert_eq!(local_day(instant, -6), JAN_1_2024 - 1);
        assert_eq!(local_day(instant, -12), JAN_1_2024 - 1);
        assert_eq!(local_day(instant, 12), JAN_1_2024);
        assert_eq!(seconds_until_local_midnight(instant, -6), 3_600);
        assert_eq!(seconds_until_local_midnight(instant, 12), 7 * 3_600);
        // 23:30 UTC is already the next day one hour east.
        let late = i64::from(JAN_1_2024) * SECONDS_PER_DAY - 1_800;
        assert_eq!(local_day(late, 0), JAN_1_2024 - 1);
        assert_eq!(local_day(late, 1), JAN_1_2024);
        // Before 1970 days still turn at midnight, not towards zero.
        assert_eq!(local_day(-1, 0), -1);
        assert_eq!(seconds_until_local_midnight(-1, 0), 1);
        assert_eq!(local_day(i64::MAX, 12), Day::MAX);
        assert_eq!(local_day(i64::MIN, -12), Day::MIN);
    }

    #[test]
    fn points_per_request_admits_the_limit_and_rejects_one_more() {
        let ledger = ledger();
        let limits = Limits {
            points_per_request: Some(10),
            ..Limits::default()
        };
        let lease = ledger
            .admit(&"k", &limits, 10, day(1), Instant::now())
            .expect("exactly the limit");
        assert_eq!((lease.points(), lease.day()), (10, 1));
        assert_eq!(
            ledger
                .admit(&"k", &limits, 11, day(1), Instant::now())
                .unwrap_err(),
            Rejection::PointsPerRequest {
                limit: 10,
                requested: 11
            }
        );
    }

    #[test]
    fn points_per_day_admits_the_call_reaching_the_limit_and_rejects_the_next() {
        let ledger = ledger();
        let limits = daily(10);
        commit(&ledger, &limits, 4, 1);
        commit(&ledger, &limits, 6, 1);
        assert_eq!(ledger.committed(&"k", 1), 10);
        assert_eq!(
            ledger
                .admit(&"k", &limits, 1, day(1), Instant::now())
                .unwrap_err(),
            Rejection::PointsPerDay {
                limit: 10,
                used: 10,
                requested: 1,
                reset_seconds: 3_600
            }
        );
        // A new day starts with the whole budget.
        commit(&ledger, &limits, 10, 2);
        assert_eq!(ledger.committed(&"k", 2), 10);
    }

    #[test]
    fn reserved_points_count_until_refunded() {
        let ledger = ledger();
        let limits = daily(10);
        let held = ledger
            .admit(&"k", &limits, 6, day(1), Instant::now())
            .expect("within quota");
        let rejected = ledger.admit(&"k", &limits, 5, day(1), Instant::now());
        assert!(matches!(
            rejected,
            Err(Rejection::PointsPerDay { used: 6, .. })
        ));
        held.settle(false);
        assert_eq!(ledger.committed(&"k", 1), 0);
        assert_eq!(ledger.in_flight(&"k"), 0);
        commit(&ledger, &limits, 10, 1);
        assert_eq!(ledger.committed(&"k", 1), 10);
    }

    #[test]
    fn dropping_an_unsettled_lease_refunds_and_releases() {
        let ledger = ledger();
        let limits = Limits {
            points_per_day: Some(10),
            max_concurrent_execution: Some(1),
            ..Limits::default()
        };
        let lease = ledger
            .admit(&"k", &limits, 10, day(1), Instant::now())
            .expect("within quota");
        assert_eq!(ledger.in_flight(&"k"), 1);
        drop(lease);
        assert_eq!(ledger.in_flight(&"k"), 0);
        assert_eq!(ledger.committed(&"k", 1), 0);
        commit(&ledger, &limits, 10, 1);
    }

    #[test]
    fn a_panic_while_holding_a_lease_releases_its_slot() {
        let ledger = Arc::new(ledger());
        let limits = Limits {
            max_concurrent_execution: Some(1),
            ..Limits::default()
        };
        let inside = Arc::clone(&ledger);
        let outcome = std::thread::spawn(move || {
            let _lease = inside
                .admit(&"k", &limits, 3, day(1), Instant::now())
                .expect("free slot");
            panic!("filter failed while the call was in flight");
        })
        .join();
        assert!(outcome.is_err());
        assert_eq!(ledger.in_flight(&"k"), 0);
        assert!(ledger
            .admit(&"k", &limits, 3, day(1), Instant::now())
            .is_ok());
    }

    #[test]
    fn concurrency_admits_up_to_the_limit_and_frees_on_settle() {
        let ledger = ledger();
        let limits = Limits {
            max_concurrent_execution: Some(2),
            ..Limits::default()
        };
        let first = ledger.admit(&"k", &limits, 1, day(1), Instant::now());
        let second = ledger.admit(&"k", &limits, 1, day(1), Instant::now());
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(
            ledger
                .admit(&"k", &limits, 1, day(1), Instant::now())
                .unwrap_err(),
            Rejection::Concurrency {
                limit: 2,
                in_flight: 2,
                retry_after_seconds: 1
            }
        );
        // Another key has its own slots.
        assert!(ledger
            .admit(&"other", &limits, 1, day(1), Instant::now())
            .is_ok());
        first.expect("admitted").settle(true);
        assert!(ledger
            .admit(&"k", &limits, 1, day(1), Instant::now())
            .is_ok());
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let ledger = ledger();
        let limits = Limits {
            points_per_request: Some(5),
            points_per_day: Some(5),
            points_per_date_window: Some(5),
            date_window_days: 2,
            max_concurrent_execution: Some(1),
        };
        let held = ledger
            .admit(&"k", &limits, 5, day(1), Instant::now())
            .expect("within quota");
        let rejection = |points| {
            ledger
                .admit(&"k", &limits, points, day(1), Instant::now())
                .unwrap_err()
        };
        assert!(matches!(rejection(6), Rejection::PointsPerRequest { .. }));
        assert!(matches!(rejection(1), Rejection::PointsPerDay { .. }));
        held.settle(false);
        commit(&ledger, &limits, 5, 0);
        let held = ledger
            .admit(&"k", &limits, 0, day(1), Instant::now())
            .expect("zero points fit");
        assert!(matches!(
            rejection(1),
            Rejection::PointsPerDateWindow { .. }
        ));
        assert!(matches!(rejection(0), Rejection::Concurrency { .. }));
        drop(held);
    }

    #[test]
    fn a_rejected_call_changes_nothing() {
        let ledger = ledger();
        let limits = Limits {
            points_per_day: Some(10),
            max_concurrent_execution: Some(1),
            ..Limits::default()
        };
        commit(&ledger, &limits, 7, 1);
        let held = ledger
            .admit(&"k", &limits, 2, day(1), Instant::now())
            .expect("within quota");
        let before = ledger.remaining(&"k", &limits, day(1));
        assert!(ledger
            .admit(&"k", &limits, 2, day(1), Instant::now())
            .is_err());
        assert!(ledger
            .admit(&"k", &limits, 1, day(1), Instant::now())
            .is_err());
        assert_eq!(ledger.remaining(&"k", &limits, day(1)), before);
        assert_eq!(ledger.in_flight(&"k"), 1);
        assert_eq!(ledger.committed(&"k", 1), 7);
        held.settle(true);
        assert_eq!(ledger.committed(&"k", 1), 9);
    }

    #[test]
    fn missing_limits_are_unlimited() {
        let ledger = ledger();
        let leases: Vec<_> = (0..100)
            .map(|_| {
                ledger.admit(
                    &"k",
                    &Limits::default(),
                    u64::MAX / 200,
                    day(1),
                    Instant::now(),
                )
            })
            .collect::<Result<_, _>>()
            .expect("nothing limits these calls");
        assert_eq!(ledger.in_flight(&"k"), 100);
        leases.into_iter().for_each(|lease| lease.settle(true));
        assert_eq!(ledger.committed(&"k", 1), u64::MAX / 200 * 100);
        assert_eq!(ledger.remaining(&"k", &Limits::default(), day(1)), None);
    }

    #[test]
    fn the_date_window_sums_today_and_the_days_before() {
        let ledger = ledger();
        let limits = window(10, 3);
        commit(&ledger, &limits, 4, 1);
        commit(&ledger, &limits, 3, 2);
        commit(&ledger, &limits, 3, 3);
        assert_eq!(
            ledger
                .admit(&"k", &limits, 1, day(3), Instant::now())
                .unwrap_err(),
            Rejection::PointsPerDateWindow {
                limit: 10,
                used: 10,
                requested: 1,
                window_days: 3,
                // Day 1's 4 points leave at the next midnight.
                reset_seconds: 3_600
            }
        );
        // Day 1 has left the window: 3 + 3 used.
        commit(&ledger, &limits, 4, 4);
        assert!(ledger
            .admit(&"k", &limits, 1, day(4), Instant::now())
            .is_err());
        // Day 2 has left: 3 + 4 used.
        commit(&ledger, &limits, 3, 5);
        assert!(ledger
            .admit(&"k", &limits, 1, day(5), Instant::now())
            .is_err());
    }

    #[test]
    fn the_window_reset_waits_for_enough_use_to_age_out() {
        let ledger = ledger();
        let limits = window(10, 3);
        commit(&ledger, &limits, 1, 1);
        commit(&ledger, &limits, 8, 2);
        commit(&ledger, &limits, 1, 3);
        let rejection = |points| {
            ledger
                .admit(&"k", &limits, points, day(3), Instant::now())
                .unwrap_err()
        };
        // Dropping day 1 frees 1 point, enough for 1 but not for 2; dropping day 2 frees 8 more.
        assert!(matches!(
            rejection(2),
            Rejection::PointsPerDateWindow {
                used: 10,
                reset_seconds: 90_000,
                ..
            }
        ));
        assert!(matches!(
            rejection(1),
            Rejection::PointsPerDateWindow {
                reset_seconds: 3_600,
                ..
            }
        ));
        // Never fits: reported as when all of today's use has aged out.
        assert!(matches!(
            rejection(11),
            Rejection::PointsPerDateWindow {
                reset_seconds: 176_400,
                ..
            }
        ));
    }

    #[test]
    fn the_window_counts_points_still_reserved_on_earlier_days() {
        let ledger = ledger();
        let limits = window(10, 2);
        let overnight = ledger
            .admit(&"k", &limits, 6, day(1), Instant::now())
            .expect("within quota");
        assert!(matches!(
            ledger.admit(&"k", &limits, 5, day(2), Instant::now()),
            Err(Rejection::PointsPerDateWindow { used: 6, .. })
        ));
        overnight.settle(true);
        assert_eq!(ledger.committed(&"k", 1), 6);
        assert_eq!(ledger.committed(&"k", 2), 0);
        commit(&ledger, &limits, 4, 2);
    }

    #[test]
    fn an_admission_on_an_earlier_day_respects_later_windows() {
        let ledger = ledger();
        let limits = window(10, 2);
        commit(&ledger, &limits, 8, 11);
        // Day 10's own window holds nothing, but day 11's window would reach 13.
        assert!(matches!(
            ledger.admit(&"k", &limits, 5, day(10), Instant::now()),
            Err(Rejection::PointsPerDateWindow { used: 8, .. })
        ));
        commit(&ledger, &limits, 2, 10);
        assert!(ledger
            .admit(&"k", &limits, 1, day(10), Instant::now())
            .is_err());
    }

    #[test]
    fn a_day_already_spent_goes_on_when_the_clock_is_set_back() {
        let ledger = ledger();
        let limits = daily(10);
        commit(&ledger, &limits, 10, 11);
        // A timezone change puts the user on day 10: day 11 goes on, and ends a day later.
        match ledger.admit(&"k", &limits, 1, day(10), Instant::now()) {
            Err(Rejection::PointsPerDay {
                used: 10,
                reset_seconds,
                ..
            }) => assert_eq!(reset_seconds, 3_600 + 86_400),
            other => panic!("{other:?}"),
        }
        let remaining = ledger.remaining(&"k", &limits, day(10)).unwrap();
        assert_eq!((remaining.remaining, remaining.reset_seconds), (0, 90_000));
        // A day whose points were all refunded holds nobody back.
        let refunded = ledger
            .admit(&"j", &limits, 4, day(11), Instant::now())
            .unwrap();
        refunded.settle(false);
        ledger
            .admit(&"j", &limits, 10, day(10), Instant::now())
            .expect("day 11 holds no points of j")
            .settle(true);
        assert_eq!(ledger.committed(&"j", 10), 10);
        // The local day catching up is the same day; the one after it is fresh.
        assert!(ledger
            .admit(&"k", &limits, 1, day(11), Instant::now())
            .is_err());
        commit(&ledger, &limits, 10, 12);
    }

    #[test]
    fn an_expired_lease_is_reaped_and_its_late_settle_does_nothing() {
        let ledger = ledger();
        let limits = Limits {
            points_per_day: Some(10),
            max_concurrent_execution: Some(1),
            ..Limits::default()
        };
        let admitted_at = Instant::now();
        let lost = ledger
            .admit(&"k", &limits, 10, day(1), admitted_at)
            .expect("within quota");
        assert_eq!(
            ledger.reap_expired(admitted_at + TTL - Duration::from_millis(1)),
            0
        );
        assert_eq!(ledger.in_flight(&"k"), 1);
        assert_eq!(ledger.reap_expired(admitted_at + TTL), 1);
        assert_eq!(ledger.in_flight(&"k"), 0);
        // The slot and the points are free again; the next call reuses the freed lease slot.
        let next = ledger
            .admit(&"k", &limits, 4, day(1), admitted_at + TTL)
            .expect("slot and points were refunded");
        lost.settle(true);
        assert_eq!(ledger.committed(&"k", 1), 0);
        assert_eq!(ledger.in_flight(&"k"), 1);
        next.settle(true);
        assert_eq!(ledger.committed(&"k", 1), 4);
        assert_eq!(ledger.in_flight(&"k"), 0);
        assert_eq!(ledger.reap_expired(admitted_at + TTL * 10), 0);
    }

    #[test]
    fn a_lease_whose_deadline_cannot_be_represented_never_expires() {
        let ledger: Ledger<&'static str> = Ledger::new(Duration::MAX);
        let now = Instant::now();
        let lease = ledger
            .admit(&"k", &Limits::default(), 1, day(1), now)
            .expect("unlimited");
        assert_eq!(ledger.reap_expired(now + Duration::from_secs(1 << 40)), 0);
        lease.settle(true);
        assert_eq!(ledger.committed(&"k", 1), 1);
    }

    #[test]
    fn take_dirty_hands_out_changed_totals_once() {
        let ledger = ledger();
        let limits = Limits::default();
        commit(&ledger, &limits, 3, 1);
        commit(&ledger, &limits, 4, 1);
        commit(&ledger, &limits, 5, 2);
        ledger
            .admit(&"refunded", &limits, 9, day(1), Instant::now())
            .expect("unlimited")
            .settle(false);
        let mut dirty = ledger.take_dirty();
        dirty.sort();
        assert_eq!(dirty, vec![("k", 1, 7), ("k", 2, 5)]);
        assert!(ledger.take_dirty().is_empty());
        commit(&ledger, &limits, 1, 2);
        assert_eq!(ledger.take_dirty(), vec![("k", 2, 6)]);
    }

    #[test]
    fn restored_points_count_against_the_quota_and_are_not_dirty() {
        let ledger = ledger();
        let limits = daily(10);
        ledger.restore("k", 1, 5);
        ledger.restore("k", 1, 3);
        assert_eq!(ledger.committed(&"k", 1), 8);
        assert!(ledger.take_dirty().is_empty());
        assert!(matches!(
            ledger.admit(&"k", &limits, 3, day(1), Instant::now()),
            Err(Rejection::PointsPerDay { used: 8, .. })
        ));
        commit(&ledger, &limits, 2, 1);
        assert_eq!(ledger.take_dirty(), vec![("k", 1, 10)]);
    }

    #[test]
    fn restoring_at_least_never_counts_a_day_twice() {
        let ledger = ledger();
        let limits = Limits::default();
        commit(&ledger, &limits, 4, 1);
        ledger.restore_at_least("k", 1, 3);
        assert_eq!(
            ledger.committed(&"k", 1),
            4,
            "the ledger's own count stands"
        );
        ledger.restore_at_least("k", 1, 6);
        assert_eq!(ledger.committed(&"k", 1), 6, "the store knew more");
        ledger.restore_at_least("k", 0, 2);
        assert_eq!(ledger.committed(&"k", 0), 2, "a day never loaded");
    }

    #[test]
    fn old_days_are_pruned_once_saved() {
        let ledger = ledger();
        let limits = Limits::default();
        commit(&ledger, &limits, 8, 0);
        // Day 0 is outside the retained month but not saved yet: it stays.
        commit(&ledger, &limits, 1, 40);
        assert_eq!(ledger.committed(&"k", 0), 8);
        assert_eq!(ledger.take_dirty().len(), 2);
        commit(&ledger, &limits, 1, 41);
        assert_eq!(ledger.committed(&"k", 0), 0);
        assert_eq!(ledger.committed(&"k", 40), 1);
    }

    #[test]
    fn a_window_wider_than_a_month_keeps_its_days() {
        let ledger = ledger();
        let limits = window(10, 45);
        commit(&ledger, &limits, 8, 0);
        ledger.take_dirty();
        commit(&ledger, &limits, 1, 40);
        assert_eq!(ledger.committed(&"k", 0), 8);
        assert!(ledger
            .admit(&"k", &limits, 2, day(44), Instant::now())
            .is_err());
    }

    #[test]
    fn remaining_reports_the_tightest_points_quota() {
        let ledger = ledger();
        let limits = Limits {
            points_per_day: Some(10),
            points_per_date_window: Some(15),
            date_window_days: 3,
            ..Limits::default()
        };
        assert_eq!(
            ledger.remaining(&"k", &limits, day(5)),
            Some(Remaining {
                window_days: 1,
                limit: 10,
                remaining: 10,
                reset_seconds: 3_600
            })
        );
        commit(&ledger, &limits, 9, 3);
        // On day 4 the oldest used day of the window is day 3, which leaves two midnights later.
        assert_eq!(
            ledger.remaining(&"k", &window(15, 3), day(4)),
            Some(Remaining {
                window_days: 3,
                limit: 15,
                remaining: 6,
                reset_seconds: 90_000
            })
        );
        let _held = ledger
            .admit(&"k", &limits, 2, day(5), Instant::now())
            .expect("within quota");
        // Day: 8 left; window: 15 - 9 - 2 = 4 left, growing when day 3 leaves at midnight.
        assert_eq!(
            ledger.remaining(&"k", &limits, day(5)),
            Some(Remaining {
                window_days: 3,
                limit: 15,
                remaining: 4,
                reset_seconds: 3_600
            })
        );
        assert_eq!(
            ledger.remaining(&"k", &daily(20), day(5)),
            Some(Remaining {
                window_days: 1,
                limit: 20,
                remaining: 18,
                reset_seconds: 3_600
            })
        );
        // The held call's answer gives its 2 points back: counted in each quota before the
        // tightest is taken (the day then has 10, the window 6).
        assert_eq!(
            ledger
                .remaining_returning(&"k", &limits, day(5), Some((day(5).day, 2)))
                .map(|r| (r.window_days, r.remaining)),
            Some((3, 6))
        );
        // Seen the next day: the new day's 10 are whole, and the window (days 4-6, day 3's 9
        // points gone) has 15 once the call of day 5 gives its 2 back.
        assert_eq!(
            ledger
                .remaining_returning(&"k", &limits, day(6), Some((day(5).day, 2)))
                .map(|r| (r.window_days, r.remaining)),
            Some((1, 10))
        );
        assert_eq!(
            ledger
                .remaining_returning(&"k", &window(15, 3), day(6), Some((day(5).day, 2)))
                .map(|r| r.remaining),
            Some(15)
        );
        assert_eq!(
            ledger
                .remaining(&"k", &window(15, 3), day(6))
                .map(|r| r.remaining),
            Some(13)
        );
        assert_eq!(
            ledger
                .remaining_returning(&"k", &daily(20), day(6), Some((day(5).day, 2)))
                .map(|r| r.remaining),
            Some(20)
        );
    }

    #[test]
    fn points_given_back_are_no_use_that_holds_the_window_reset() {
        // A call of day 5 still held, answered on day 6 with an error: its day holds nothing
        // once it settles, so the window resets when day 6's use leaves it, three midnights on.
        let ledger = ledger();
        let limits = window(15, 3);
        let held = ledger
            .admit(&"k", &limits, 2, day(5), Instant::now())
            .expect("within quota");
        commit(&ledger, &limits, 10, 6);
        let told = ledger
            .remaining_returning(&"k", &limits, day(6), Some((5, 2)))
            .unwrap();
        held.settle(false);
        let after = ledger.remaining(&"k", &limits, day(6)).unwrap();
        assert_eq!(told, after);
        assert_eq!(
            (after.remaining, after.reset_seconds),
            (5, 3_600 + 2 * 86_400)
        );
    }

    #[test]
    fn many_threads_never_exceed_the_slots_or_the_daily_points() {
        const THREADS: usize = 8;
        const CALLS_PER_THREAD: u64 = 10_000;
        const POINTS_PER_DAY: u64 = 50_000;
        const MAX_CONCURRENT: u32 = 5;
        let ledger: Arc<Ledger<&'static str>> = Arc::new(ledger());
        let limits = Limits {
            points_per_day: Some(POINTS_PER_DAY),
            max_concurrent_execution: Some(MAX_CONCURRENT),
            ..Limits::default()
        };
        let observed_in_flight = AtomicU32::new(0);
        let observed_max = AtomicU32::new(0);
        let start = Barrier::new(THREADS);
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    start.wait();
                    for _ in 0..CALLS_PER_THREAD {
                        loop {
                            match ledger.admit(&"k", &limits, 1, day(1), Instant::now()) {
                                Ok(lease) => {
                                    let now_in_flight =
                                        observed_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                                    observed_max.fetch_max(now_in_flight, Ordering::SeqCst);
                                    assert!(ledger.in_flight(&"k") <= MAX_CONCURRENT);
                                    observed_in_flight.fetch_sub(1, Ordering::SeqCst);
                                    lease.settle(true);
                                    break;
                                }
                                Err(Rejection::Concurrency { .. }) => std::thread::yield_now(),
                                Err(Rejection::PointsPerDay { .. }) => break,
                                Err(other) => panic!("unexpected rejection {other:?}"),
                            }
                        }
                    }
                });
            }
        });
        let demand = THREADS as u64 * CALLS_PER_THREAD;
        assert!(observed_max.load(Ordering::SeqCst) <= MAX_CONCURRENT);
        assert!(observed_max.load(Ordering::SeqCst) >= 1);
        assert_eq!(ledger.committed(&"k", 1), POINTS_PER_DAY.min(demand));
        assert_eq!(ledger.in_flight(&"k"), 0);
    }

    #[test]
    fn threads_on_different_keys_keep_separate_budgets() {
        const THREADS: usize = 4;
        let keys = ["a", "b", "c", "d"];
        let ledger: Ledger<&'static str> = ledger();
        let limits = daily(3_000);
        std::thread::scope(|scope| {
            for key in keys.iter().take(THREADS) {
                let ledger = &ledger;
                scope.spawn(move || {
                    for _ in 0..5_000 {
                        if let Ok(lease) = ledger.admit(key, &limits, 1, day(1), Instant::now()) {
                            lease.settle(true);
                        }
                    }
                });
            }
        });
        for key in keys {
            assert_eq!(ledger.committed(&key, 1), 3_000);
        }
        assert_eq!(ledger.take_dirty().len(), THREADS);
    }

    /// A reference model of the quota rules, with plain maps and no concurrency.
    #[derive(Default)]
    struct ModelAccount {
        committed: BTreeMap<Day, u64>,
        reserved: BTreeMap<Day, u64>,
        in_flight: u32,
    }

    impl ModelAccount {
        fn used(&self, first: Day, last: Day) -> u64 {
            (first..=last)
                .map(|day| {
                    self.committed.get(&day).copied().unwrap_or(0)
                        + self.reserved.get(&day).copied().unwrap_or(0)
                })
                .sum()
        }

        /// The kind of rejection the rules call for, if any (days only move forward here).
        fn decide(&self, limits: &Limits, points: u64, today: Day) -> Option<&'static str> {
            let window_first = today - limits.date_window_days as Day + 1;
            if limits
                .points_per_request
                .is_some_and(|limit| points > limit)
            {
                Some("request")
            } else if limits
                .points_per_day
                .is_some_and(|limit| self.used(today, today) + points > limit)
            {
                Some("day")
            } else if limits
                .points_per_date_window
                .is_some_and(|limit| self.used(window_first, today) + points > limit)
            {
                Some("window")
            } else if limits
                .max_concurrent_execution
                .is_some_and(|limit| self.in_flight >= limit)
            {
                Some("concurrency")
            } else {
                None
            }
        }
    }

    fn kind(rejection: &Rejection) -> &'static str {
        match rejection {
            Rejection::PointsPerRequest { .. } => "request",
            Rejection::PointsPerDay { .. } => "day",
            Rejection::PointsPerDateWindow { .. } => "window",
            Rejection::Concurrency { .. } => "concurrency",
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit { key: usize, points: u64 },
        Settle { pick: usize, commit: bool },
        Drop { pick: usize },
        NextDay,
        Wait { seconds: u64 },
        Reap,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..2usize, 0..=14u64).prop_map(|(key, points)| Op::Admit { key, points }),
            4 => (any::<usize>(), any::<bool>()).prop_map(|(pick, commit)| Op::Settle { pick, commit }),
            1 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
            1 => Just(Op::NextDay),
            1 => (1..=6u64).prop_map(|seconds| Op::Wait { seconds }),
            1 => Just(Op::Reap),
        ]
    }

    struct Held {
        lease: Lease<usize>,
        key: usize,
        deadline_seconds: u64,
        reaped: bool,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_calls_never_exceed_a_quota_and_commit_exactly(ops in prop::collection::vec(op(), 1..200)) {
            const KEYS: usize = 2;
            const TTL_SECONDS: u64 = 8;
            let limits = Limits {
                points_per_request: Some(12),
                points_per_day: Some(30),
                points_per_date_window: Some(60),
                date_window_days: 3,
                max_concurrent_execution: Some(3),
            };
            let ledger: Ledger<usize> = Ledger::new(Duration::from_secs(TTL_SECONDS));
            let base = Instant::now();
            let mut today: Day = 100;
            let mut elapsed_seconds = 0u64;
            let mut model: Vec<ModelAccount> = (0..KEYS).map(|_| ModelAccount::default()).collect();
            let mut held: Vec<Held> = Vec::new();

            for op in ops {
                let now = base + Duration::from_secs(elapsed_seconds);
                match op {
                    Op::Admit { key, points } => {
                        let expected = model[key].decide(&limits, points, today);
                        match ledger.admit(&key, &limits, points, day(today), now) {
                            Ok(lease) => {
                                prop_assert_eq!(expected, None);
                                *model[key].reserved.entry(today).or_default() += points;
                                model[key].in_flight += 1;
                                held.push(Held { lease, key, deadline_seconds: elapsed_seconds + TTL_SECONDS, reaped: false });
                            }
                            Err(rejection) => prop_assert_eq!(expected, Some(kind(&rejection))),
                        }
                    }
                    Op::Settle { pick, .. } | Op::Drop { pick } if !held.is_empty() => {
                        let commit = matches!(op, Op::Settle { commit: true, .. });
                        let taken = held.swap_remove(pick % held.len());
                        if !taken.reaped {
                            let account = &mut model[taken.key];
                            let points = taken.lease.points();
                            *account.reserved.entry(taken.lease.day()).or_default() -= points;
                            account.in_flight -= 1;
                            if commit {
                                *account.committed.entry(taken.lease.day()).or_default() += points;
                            }
                        }
                        if matches!(op, Op::Settle { .. }) {
                            taken.lease.settle(commit);
                        } else {
                            drop(taken.lease);
                        }
                    }
                    Op::Settle { .. } | Op::Drop { .. } => {}
                    Op::NextDay => today += 1,
                    Op::Wait { seconds } => elapsed_seconds += seconds,
                    Op::Reap => {
                        let mut expected_reaped = 0;
                        for entry in held.iter_mut().filter(|entry| !entry.reaped && entry.deadline_seconds <= elapsed_seconds) {
                            entry.reaped = true;
                            expected_reaped += 1;
                            let account = &mut model[entry.key];
                            *account.reserved.entry(entry.lease.day()).or_default() -= entry.lease.points();
                            account.in_flight -= 1;
                        }
                        prop_assert_eq!(ledger.reap_expired(now), expected_reaped);
                    }
                }

                for (key, account) in model.iter().enumerate() {
                    prop_assert_eq!(ledger.in_flight(&key), account.in_flight);
                    prop_assert!(account.in_flight <= 3);
                    let remaining_today = ledger.remaining(&key, &daily(30), day(today)).map(|left| left.remaining);
                    prop_assert_eq!(remaining_today, Some(30 - account.used(today, today)));
                    for checked_day in 95..=today + 3 {
                        prop_assert_eq!(
                            ledger.committed(&key, checked_day),
                            account.committed.get(&checked_day).copied().unwrap_or(0)
                        );
                        prop_assert!(account.used(checked_day, checked_day) <= 30);
                        prop_assert!(account.used(checked_day - 2, checked_day) <= 60);
                    }
                }
            }

            drop(held);
            for key in 0..KEYS {
                prop_assert_eq!(ledger.in_flight(&key), 0);
            }
        }
    }
}
