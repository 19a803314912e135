//! Tollgate's durable state, in the embedded key-value store fjall, behind one narrow interface:
//! users, statistics (which double as the committed quota counters), audit records, captured
//! payloads and process ownership. Only this module knows fjall. Writes of the request path go
//! through the background `writer`; reads and rare administrative writes come here directly.
//!
//! Layout (keyspaces):
//! - `users`: username -> user record (JSON).
//! - `stats`: username 0x00 day(i32, order-preserving) service method_group -> points, unique points.
//! - `audit_YYYYMMDD` (one per UTC day, so retention drops whole keyspaces):
//!   `r` time_ms code -> audit record; `u` username 0x00 time_ms code and
//!   `c` company 0x00 time_ms code -> empty (visibility indexes).
//! - `payload_YYYYMMDD` (the UTC day the process started): code flow stage -> captured body;
//!   `p` code -> process record (owner, exchanges so far).
//! - `processes`: code -> the day its payload keyspace is (so follow-ups find it).

pub mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::QuotaValues;
use crate::model::{MethodGroup, Role, ServiceName};

/// Days since 1970-01-01 (in whatever timezone the caller means).
pub type Day = i32;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Engine(#[from] fjall::Error),
    #[error("store: corrupt record under {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store: the writer has stopped")]
    WriterGone,
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserQuota {
    pub service: ServiceName,
    pub method_group: MethodGroup,
    pub values: QuotaValues,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub username: String,
    pub password_hash: String,
    pub company_key: String,
    pub roles: Vec<Role>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub timezone: i32,
    /// Bumped by every password change: tokens carrying an older version are revoked.
    pub token_version: u32,
    /// Set once the user changed the password themselves, so config seeding leaves it be.
    #[serde(default)]
    pub password_changed: bool,
    #[serde(default)]
    pub quotas: Vec<UserQuota>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub code: Uuid,
    pub username: String,
    pub company_key: String,
    pub service: ServiceName,
    pub operation: String,
    pub method_group: MethodGroup,
    /// UTC milliseconds since the epoch when the call arrived.
    pub time_ms: i64,
    /// The user's timezone then, so tracedata shows the offset they saw.
    pub timezone: i32,
    pub points: u64,
    pub unique_points: u64,
    pub duration_us: u64,
    pub status: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Flow {
    Input = 0,
    Output = 1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub content_type: Option<String>,
    pub truncated: bool,
    pub body: bytes::Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub owner: String,
    pub company_key: String,
    /// UTC day of the first exchange: names the payload keyspace.
    pub day: Day,
    pub exchanges: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayCounts {
    pub points: u64,
    pub unique_points: u64,
}

/// Who may see which audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    User(String),
    Company(String),
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditSort {
    Time,
    Username,
    Service,
    Operation,
    MethodGroup,
    PointsCount,
    Duration,
}

#[derive(Debug, Clone)]
pub struct AuditQuery {
    pub visibility: Visibility,
    pub from_ms: i64,
    pub to_ms: i64,
    pub service: Option<ServiceName>,
    pub operation: Option<String>,
    pub method_group: Option<MethodGroup>,
    pub sort: AuditSort,
    pub descending: bool,
    pub offset: usize,
    pub limit: usize,
}

#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    pub overall_total: u64,
    pub filter_total: u64,
}

pub struct Store {
    db: Database,
    users: Keyspace,
    stats: Keyspace,
    processes: Keyspace,
    days: Mutex<BTreeMap<String, Keyspace>>,
}

pub fn day_of_ms(time_ms: i64) -> Day {
    time_ms.div_euclid(86_400_000) as Day
}

pub fn date_of_day(day: Day) -> NaiveDate {
    NaiveDate::from_num_days_from_ce_opt(day + 719_163).unwrap_or_default()
}

pub fn day_of_date(date: NaiveDate) -> Day {
    date.num_days_from_ce() - 719_163
}

fn day_name(prefix: &str, day: Day) -> String {
    format!("{prefix}_{}", date_of_day(day).format("%Y%m%d"))
}

/// i32 with the sign bit flipped: big-endian bytes then sort like the numbers.
fn day_key(day: Day) -> [u8; 4] {
    ((day as u32) ^ 0x8000_0000).to_be_bytes()
}

fn day_from_key(bytes: [u8; 4]) -> Day {
    (u32::from_be_bytes(bytes) ^ 0x8000_0000) as i32
}

fn time_key(time_ms: i64) -> [u8; 8] {
    ((time_ms as u64) ^ 0x8000_0000_0000_0000).to_be_bytes()
}

fn stats_key(username: &str, day: Day, service: ServiceName, group: MethodGroup) -> Vec<u8> {
    let mut k = Vec::with_capacity(username.len() + 7);
    k.extend_from_slice(username.as_bytes());
    k.push(0);
    k.extend_from_slice(&day_key(day));
    k.push(service.code());
    k.push(group.code());
    k
}

fn payload_key(code: &Uuid, flow: Flow, stage: u8) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..16].copy_from_slice(code.as_bytes());
    k[16] = flow as u8;
    k[17] = stage;
    k
}

fn process_key(code: &Uuid) -> [u8; 17] {
    let mut k = [b'p'; 17];
    k[1..].copy_from_slice(code.as_bytes());
    k
}

/// The bytes after the owner in an index key, and after the tag in a record key: time, code,
/// exchange. The exchange number (1-based, within the process) keeps two exchanges of one
/// process that arrive in the same millisecond apart; without it the later overwrote the
/// earlier's audit record.
const AUDIT_KEY_TAIL: usize = 8 + 16 + 4;

fn index_key(tag: u8, owner: &str, time_ms: i64, code: &Uuid, exchange: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 2 + AUDIT_KEY_TAIL);
    k.push(tag);
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(&time_key(time_ms));
    k.extend_from_slice(code.as_bytes());
    k.extend_from_slice(&exchange.to_be_bytes());
    k
}

fn record_key(time_ms: i64, code: &Uuid, exchange: u32) -> [u8; 1 + AUDIT_KEY_TAIL] {
    let mut k = [b'r'; 1 + AUDIT_KEY_TAIL];
    k[1..9].copy_from_slice(&time_key(time_ms));
    k[9..25].copy_from_slice(code.as_bytes());
    k[25..].copy_from_slice(&exchange.to_be_bytes());
    k
}

/// The record key an index key points to.
fn record_key_of_index(index_key: &[u8]) -> Option<[u8; 1 + AUDIT_KEY_TAIL]> {
    let tail = index_key.get(index_key.len().checked_sub(AUDIT_KEY_TAIL)?..)?;
    let mut k = [b'r'; 1 + AUDIT_KEY_TAIL];
    k[1..].copy_from_slice(tail);
    Some(k)
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records always serialise")
}

fn encode_payload(p: &Payload) -> Vec<u8> {
    let ct = p.content_type.as_deref().unwrap_or("").as_bytes();
    let ct_len = ct.len().min(u16::MAX as usize);
    let mut v = Vec::with_capacity(3 + ct_len + p.body.len());
    v.push(p.truncated as u8);
    v.extend_from_slice(&(ct_len as u16).to_be_bytes());
    v.extend_from_slice(&ct[..ct_len]);
    v.extend_from_slice(&p.body);
    v
}

fn decode_payload(v: &[u8]) -> Option<Payload> {
    let truncated = *v.first()? != 0;
    let ct_len = u16::from_be_bytes([*v.get(1)?, *v.get(2)?]) as usize;
    let ct = v.get(3..3 + ct_len)?;
    Some(Payload {
        content_type: (!ct.is_empty()).then(|| String::from_utf8_lossy(ct).into_owned()),
        truncated,
        body: bytes::Bytes::copy_from_slice(v.get(3 + ct_len..)?),
    })
}

fn counts_value(c: DayCounts) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&c.points.to_be_bytes());
    v[8..].copy_from_slice(&c.unique_points.to_be_bytes());
    v
}

fn counts_from(v: &[u8]) -> DayCounts {
    let n = |r: std::ops::Range<usize>| {
        v.get(r)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    };
    DayCounts {
        points: n(0..8),
        unique_points: n(8..16),
    }
}

impl Store {
    /// Opens (or creates) the store at `path`. Fails if another process holds it open.
    pub fn open(path: &Path) -> Result<Arc<Store>> {
        std::fs::create_dir_all(path).map_err(|e| fjall::Error::from(e))?;
        let db = Database::builder(path).cache_size(64 << 20).open()?;
        let users = db.keyspace("users", KeyspaceCreateOptions::default)?;
        let stats = db.keyspace("stats", KeyspaceCreateOptions::default)?;
        let processes = db.keyspace("processes", KeyspaceCreateOptions::default)?;
        let mut days = BTreeMap::new();
        for name in db.list_keyspace_names() {
            let name = name.to_string();
            if name.starts_with("audit_") || name.starts_with("payload_") {
                let ks = db.keyspace(&name, KeyspaceCreateOptions::default)?;
                days.insert(name, ks);
            }
        }
        Ok(Arc::new(Store {
            db,
            users,
            stats,
            processes,
            days: Mutex::new(days),
        }))
    }

    fn day_keyspace(&self, prefix: &str, day: Day) -> Result<Keyspace> {
        let name = day_name(prefix, day);
        let mut days = self.days.lock();
        if let Some(ks) = days.get(&name) {
            return Ok(ks.clone());
        }
        let ks = if prefix == "payload" {
            self.db.keyspace(&name, || {
                KeyspaceCreateOptions::default()
                    .with_kv_separation(Some(fjall::KvSeparationOptions::default()))
            })?
        } else {
            self.db.keyspace(&name, KeyspaceCreateOptions::default)?
        };
        days.insert(name, ks.clone());
        Ok(ks)
    }

    fn existing_day_keyspace(&self, prefix: &str, day: Day) -> Option<Keyspace> {
        self.days.lock().get(&day_name(prefix, day)).cloned()
    }

    /// Makes everything written so far durable (fsync).
    pub fn sync(&self) -> Result<()> {
        Ok(self.db.persist(PersistMode::SyncAll)?)
    }

    /// Whether the store answers reads (for the health check).
    pub fn healthy(&self) -> bool {
        self.users
            .first_key_value()
            .map(|g| g.key().is_ok())
            .unwrap_or(true)
    }

    // ---- users ----

    pub fn users(&self) -> Result<Vec<UserRecord>> {
        let mut out = Vec::new();
        for guard in self.users.iter() {
            let (k, v) = guard.into_inner()?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    pub fn user(&self, username: &str) -> Result<Option<UserRecord>> {
        match self.users.get(username)? {
            Some(v) => Ok(Some(decode(username.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Stores a user durably before returning (accounts are rare, precious writes).
    pub fn put_user(&self, user: &UserRecord) -> Result<()> {
        self.users.insert(user.username.as_str(), encode(user))?;
        self.sync()
    }

    pub fn remove_user(&self, username: &str) -> Result<bool> {
        let existed = self.users.contains_key(username)?;
        self.users.remove(username)?;
        self.sync()?;
        Ok(existed)
    }

    // ---- statistics ----

    pub fn day_counts(
        &self,
        username: &str,
        day: Day,
        service: ServiceName,
        group: MethodGroup,
    ) -> Result<DayCounts> {
        Ok(self
            .stats
            .get(stats_key(username, day, service, group))?
            .map(|v| counts_from(&v))
            .unwrap_or_default())
    }

    /// One user's statistics for days `from..=to`, ordered by day.
    pub fn stats(
        &self,
        username: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(Day, ServiceName, MethodGroup, DayCounts)>> {
        let lo = stats_key(username, from, ServiceName::ALL[0], MethodGroup::ALL[0]);
        let mut hi = stats_key(username, to, ServiceName::ALL[0], MethodGroup::ALL[0]);
        hi.truncate(username.len() + 5);
        hi.extend_from_slice(&[0xff, 0xff]);
        let mut out = Vec::new();
        for guard in self.stats.range(lo..=hi) {
            let (k, v) = guard.into_inner()?;
            if let Some(row) = Self::stats_row(&k, username.len(), &v) {
                out.push(row);
            }
        }
        Ok(out)
    }

    fn stats_row(
        k: &[u8],
        name_len: usize,
        v: &[u8],
    ) -> Option<(Day, ServiceName, MethodGroup, DayCounts)> {
        let day = day_from_key(k.get(name_len + 1..name_len + 5)?.try_into().ok()?);
        let service = ServiceName::from_code(*k.get(name_len + 5)?)?;
        let group = MethodGroup::from_code(*k.get(name_len + 6)?)?;
        Some((day, service, group, counts_from(v)))
    }

    /// Every (user, day, service, group) with points on a day >= `since`: the ledger's restore.
    pub fn stats_since(
        &self,
        since: Day,
    ) -> Result<Vec<(String, Day, ServiceName, MethodGroup, DayCounts)>> {
        let mut out = Vec::new();
        for guard in self.stats.iter() {
            let (k, v) = guard.into_inner()?;
            let Some(name_len) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            if let Some((day, s, g, c)) = Self::stats_row(&k, name_len, &v) {
                if day >= since {
                    out.push((
                        String::from_utf8_lossy(&k[..name_len]).into_owned(),
                        day,
                        s,
                        g,
                        c,
                    ));
                }
            }
        }
        Ok(out)
    }

    // ---- processes and payloads ----

    pub fn process(&self, code: &Uuid) -> Result<Option<ProcessRecord>> {
        let Some(day) = self.processes.get(code.as_bytes())? else {
            return Ok(None);
        };
        let day = day_from_key(day.as_ref().try_into().unwrap_or([0; 4]));
        let Some(ks) = self.existing_day_keyspace("payload", day) else {
            return Ok(None);
        };
        match ks.get(process_key(code))? {
            Some(v) => Ok(Some(decode(code.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub fn payload(&self, code: &Uuid, flow: Flow, stage: u8) -> Result<Option<Payload>> {
        let Some(process) = self.process(code)? else {
            return Ok(None);
        };
        let Some(ks) = self.existing_day_keyspace("payload", process.day) else {
            return Ok(None);
        };
        Ok(ks
            .get(payload_key(code, flow, stage))?
            .and_then(|v| decode_payload(&v)))
    }

    // ---- audit ----

    /// A page of audit records visible to the caller, with the totals the API reports.
    pub fn audit(&self, q: &AuditQuery) -> Result<AuditPage> {
        let mut page = AuditPage::default();
        let mut matched: Vec<AuditRecord> = Vec::new();
        let keep_all = q.sort != AuditSort::Time;
        let wanted = q.offset.saturating_add(q.limit);
        let (tag, owner) = match &q.visibility {
            Visibility::User(u) => (b'u', u.as_str()),
            Visibility::Company(c) => (b'c', c.as_str()),
            Visibility::All => (b'r', ""),
        };
        let first = day_of_ms(q.from_ms);
        let last = day_of_ms(q.to_ms.saturating_sub(1));
        // Only the day partitions that exist: walking every day of the window instead made a
        // window of centuries (which any caller may ask for) cost seconds of CPU.
        let mut days: Vec<(Day, Keyspace)> = self
            .days
            .lock()
            .iter()
            .filter_map(|(name, ks)| {
                let date =
                    NaiveDate::parse_from_str(name.strip_prefix("audit_")?, "%Y%m%d").ok()?;
                let day = day_of_date(date);
                (first..=last).contains(&day).then(|| (day, ks.clone()))
            })
            .collect();
        days.sort_by_key(|(day, _)| *day);
        if q.descending && !keep_all {
            days.reverse();
        }
        for (_, ks) in days {
            let (lo, hi) = if tag == b'r' {
                (
                    record_key(q.from_ms, &Uuid::nil(), 0).to_vec(),
                    record_key(q.to_ms, &Uuid::nil(), 0).to_vec(),
                )
            } else {
                (
                    index_key(tag, owner, q.from_ms, &Uuid::nil(), 0),
                    index_key(tag, owner, q.to_ms, &Uuid::nil(), 0),
                )
            };
            let iter = ks.range(lo..hi);
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = if q.descending && !keep_all {
                Box::new(iter.rev())
            } else {
                Box::new(iter)
            };
            for guard in iter {
                let (k, v) = guard.into_inner()?;
                let record: AuditRecord = if tag == b'r' {
                    decode(&k, &v)?
                } else {
                    let Some(rk) = record_key_of_index(&k) else {
                        continue;
                    };
                    let Some(v) = ks.get(rk)? else { continue };
                    decode(&rk, &v)?
                };
                page.overall_total += 1;
                if q.service.is_some_and(|s| s != record.service)
                    || q.method_group.is_some_and(|g| g != record.method_group)
                    || q.operation
                        .as_deref()
                        .is_some_and(|o| o != record.operation)
                {
                    continue;
                }
                page.filter_total += 1;
                if keep_all || matched.len() < wanted {
                    matched.push(record);
                }
            }
        }
        if keep_all {
            let key = |r: &AuditRecord| -> (String, i64) {
                match q.sort {
                    AuditSort::Username => (r.username.clone(), r.time_ms),
                    AuditSort::Service => (r.service.as_str().into(), r.time_ms),
                    AuditSort::Operation => (r.operation.clone(), r.time_ms),
                    AuditSort::MethodGroup => (r.method_group.as_str().into(), r.time_ms),
                    AuditSort::PointsCount => (format!("{:020}", r.points), r.time_ms),
                    AuditSort::Duration => (format!("{:020}", r.duration_us), r.time_ms),
                    AuditSort::Time => (String::new(), r.time_ms),
                }
            };
            matched.sort_by_cached_key(key);
            if q.descending {
                matched.reverse();
            }
        }
        page.records = matched.into_iter().skip(q.offset).take(q.limit).collect();
        Ok(page)
    }

    // ---- retention ----

    /// Drops whole day keyspaces older than the retention: payloads before `payload_before`,
    /// audit before `audit_before` (UTC days). Statistics stay. Returns how many were dropped.
    pub fn drop_days_before(&self, payload_before: Day, audit_before: Day) -> Result<usize> {
        let doomed: Vec<(String, Keyspace)> = {
            let days = self.days.lock();
            days.iter()
                .filter(|(name, _)| {
                    let (prefix, limit) = if name.starts_with("audit_") {
                        ("audit_", audit_before)
                    } else {
                        ("payload_", payload_before)
                    };
                    NaiveDate::parse_from_str(&name[prefix.len()..], "%Y%m%d")
                        .map(|d| day_of_date(d) < limit)
                        .unwrap_or(false)
                })
                .map(|(n, k)| (n.clone(), k.clone()))
                .collect()
        };
        for (name, ks) in &doomed {
            self.days.lock().remove(name);
            self.db.delete_keyspace(ks.clone())?;
        }
        if doomed.iter().any(|(name, _)| name.starts_with("payload_")) {
            self.forget_processes_before(payload_before)?;
        }
        Ok(doomed.len())
    }

    /// Removes the `processes` entries (code -> day) of the payload days dropped, which
    /// otherwise stayed forever, some 25 bytes for every call ever made.
    fn forget_processes_before(&self, payload_before: Day) -> Result<usize> {
        const BATCH: usize = 10_000;
        let mut batch = self.db.batch();
        let mut removed = 0;
        for guard in self.processes.iter() {
            let (k, v) = guard.into_inner()?;
            let day = day_from_key(v.as_ref().try_into().unwrap_or([0; 4]));
            if day < payload_before {
                batch.remove(&self.processes, k);
                removed += 1;
                if removed % BATCH == 0 {
                    std::mem::replace(&mut batch, self.db.batch()).commit()?;
                }
            }
        }
        batch.commit()?;
        Ok(removed)
    }

    /// Writes every memtable out and compacts every keyspace to one sorted run: slow, for the
    /// sizing bench and for operators who want the disk back after a large retention drop.
    pub fn compact(&self) -> Result<()> {
        let mut all = vec![
            self.users.clone(),
            self.stats.clone(),
            self.processes.clone(),
        ];
        all.extend(self.days.lock().values().cloned());
        for ks in all {
            ks.rotate_memtable_and_wait()?;
            ks.major_compact()?;
        }
        Ok(())
    }

    /// Bytes on disk, for the metrics and the sizing bench.
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    pub(crate) fn now_day() -> Day {
        day_of_ms(Utc::now().timestamp_millis())
    }

    pub(crate) fn utc_of_ms(time_ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(time_ms).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_keys_sort_like_days() {
        let mut days = vec![-400, -1, 0, 1, 20_000];
        let mut keys: Vec<_> = days.iter().map(|d| day_key(*d)).collect();
        keys.sort();
        days.sort();
        assert_eq!(keys.into_iter().map(day_from_key).collect::<Vec<_>>(), days);
        assert_eq!(date_of_day(0).to_string(), "1970-01-01");
        assert_eq!(day_of_date(date_of_day(19_999)), 19_999);
    }

    #[test]
    fn payloads_round_trip_with_content_type_and_truncation() {
        let p = Payload {
            content_type: Some("application/json".into()),
            truncated: true,
            body: bytes::Bytes::from_static(b"{\"a\":1}"),
        };
        assert_eq!(decode_payload(&encode_payload(&p)), Some(p));
        let bare = Payload {
            content_type: None,
            truncated: false,
            body: bytes::Bytes::new(),
        };
        assert_eq!(decode_payload(&encode_payload(&bare)), Some(bare));
        assert_eq!(decode_payload(&[1]), None);
    }

    use std::time::Duration;
    use writer::{CallRecord, StoreWriter};

    fn call(
        username: &str,
        time_ms: i64,
        code: Uuid,
        exchanges: u32,
        charged_day: Day,
    ) -> CallRecord {
        CallRecord {
            audit: AuditRecord {
                code,
                username: username.into(),
                company_key: "acme".into(),
                service: ServiceName::UNIVERSAL,
                operation: "run_plan_calculation".into(),
                method_group: MethodGroup::PLAN,
                time_ms,
                timezone: 0,
                points: 3,
                unique_points: 2,
                duration_us: 1500,
                status: 200,
            },
            process: ProcessRecord {
                owner: username.into(),
                company_key: "acme".into(),
                day: day_of_ms(time_ms),
                exchanges,
            },
            stage: crate::trace::stage_of(exchanges - 1),
            input: Some(Payload {
                content_type: Some("application/json".into()),
                truncated: false,
                body: bytes::Bytes::from_static(br#"{"locations":[1,2,3]}"#),
            }),
            output: None,
            charged_day: Some(charged_day),
        }
    }

    fn everything(username: &str) -> AuditQuery {
        AuditQuery {
            visibility: Visibility::User(username.into()),
            from_ms: 0,
            to_ms: i64::MAX / 2,
            service: None,
            operation: None,
            method_group: None,
            sort: AuditSort::Time,
            descending: false,
            offset: 0,
            limit: 1000,
        }
    }

    fn write(store: &Arc<Store>, calls: Vec<CallRecord>) {
        let (writer, handle) =
            StoreWriter::start(store.clone(), Duration::from_millis(5), 1024, false);
        for c in calls {
            writer.try_record(c).unwrap();
        }
        writer.flush_blocking().unwrap();
        drop(writer);
        handle.join().unwrap();
    }

    #[test]
    fn retention_drops_old_day_partitions_and_keeps_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let today = Store::now_day();
        let ms = |day: Day| day as i64 * 86_400_000 + 3_600_000;
        let (ancient, old, recent) = (today - 100, today - 40, today);
        let codes = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        {
            let store = Store::open(dir.path()).unwrap();
            write(
                &store,
                vec![
                    call("alice", ms(ancient), codes[0], 1, ancient),
                    call("alice", ms(old), codes[1], 1, old),
                    call("alice", ms(recent), codes[2], 1, recent),
                ],
            );
            assert_eq!(store.audit(&everything("alice")).unwrap().records.len(), 3);
            let before = store.disk_bytes();

            // Payloads older than 30 days go, audit older than 60 days goes.
            let dropped = store.drop_days_before(today - 30, today - 60).unwrap();
            assert_eq!(dropped, 3, "payload_ancient, payload_old and audit_ancient");
            let left: Vec<i64> = store
                .audit(&everything("alice"))
                .unwrap()
                .records
                .iter()
                .map(|r| r.time_ms)
                .collect();
            assert_eq!(
                left,
                vec![ms(old), ms(recent)],
                "audit keeps its own, longer retention"
            );
            for code in &codes[..2] {
                assert_eq!(store.payload(code, Flow::Input, 0).unwrap(), None);
                assert_eq!(store.process(code).unwrap(), None);
                assert!(
                    !store.processes.contains_key(code.as_bytes()).unwrap(),
                    "the process index forgets dropped days too"
                );
            }
            assert!(store.processes.contains_key(codes[2].as_bytes()).unwrap());
            assert!(store.payload(&codes[2], Flow::Input, 0).unwrap().is_some());
            let stats = store.stats("alice", ancient, recent).unwrap();
            let days: Vec<Day> = stats.iter().map(|r| r.0).collect();
            assert_eq!(days, vec![ancient, old, recent], "statistics stay");
            assert_eq!(
                stats[0].3,
                DayCounts {
                    points: 3,
                    unique_points: 2
                }
            );
            // Idempotent: nothing left to drop.
            assert_eq!(store.drop_days_before(today - 30, today - 60).unwrap(), 0);
            assert!(store.disk_bytes() <= before);
        }
        // What was dropped stays dropped after a restart.
        let store = Store::open(dir.path()).unwrap();
        let names: Vec<String> = store.days.lock().keys().cloned().collect();
        let want: Vec<String> = vec![
            day_name("audit", old),
            day_name("audit", recent),
            day_name("payload", recent),
        ];
        let mut names_sorted = names.clone();
        names_sorted.sort();
        let mut want_sorted = want;
        want_sorted.sort();
        assert_eq!(names_sorted, want_sorted);
        assert_eq!(store.audit(&everything("alice")).unwrap().records.len(), 2);
        assert_eq!(store.stats("alice", ancient, recent).unwrap().len(), 3);
    }

    #[test]
    fn exchanges_of_one_process_in_the_same_millisecond_each_keep_their_audit_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        let code = Uuid::new_v4();
        write(
            &store,
            (1..=6)
                .map(|n| call("alice", now, code, n, Store::now_day()))
                .collect(),
        );
        let page = store.audit(&everything("alice")).unwrap();
        assert_eq!(page.records.len(), 6);
        assert_eq!(page.overall_total, 6);
        let all = AuditQuery {
            visibility: Visibility::All,
            ..everything("alice")
        };
        assert_eq!(store.audit(&all).unwrap().records.len(), 6);
        // The process record keeps the highest count even when exchanges finish out of order.
        write(&store, vec![call("alice", now, code, 4, Store::now_day())]);
        assert_eq!(store.process(&code).unwrap().unwrap().exchanges, 6);
    }
}
