//! Tollgate's durable state, in the embedded key-value store fjall, behind one narrow interface:
//! users, statistics (which double as the committed quota counters), audit records, captured
//! payloads and process ownership. Only this module knows fjall. Writes of the request path go
//! through the background `writer`; reads and rare administrative writes come here directly.
//!
//! Layout (keyspaces):
//! - `users`: username -> user record (JSON).
//! - `stats`: username 0x00 day(i32, order-preserving) service method_group -> points, unique points.
//! - `audit_YYYYMMDD` (one per UTC day, so retention drops whole keyspaces; all times in it are
//!   milliseconds into the day, all numbers big-endian):
//!   `R` ms seq -> binary audit record (`seq` numbers the day's records in writing order);
//!   `U` username 0x00 ms seq and `C` company 0x00 ms seq -> service, method group, operation
//!   number (visibility indexes that filter without reading the record);
//!   `N` scope owner 0x00 hour service method_group operation -> count (counter cells per
//!   visibility owner: scope `u` user, `c` company, `a` everything with no owner; hour 0..23, or
//!   24 for the whole day, which users' cells leave out), which give exact totals without
//!   reading records;
//!   `O` operation -> its number in the day.
//!   Older stores wrote `r` time_ms code exchange -> JSON record and empty `u`/`c` index
//!   entries, still read.
//! - `payload_YYYYMMDD` (the UTC day the process started): `p` code -> process record (binary:
//!   owner, company, day, exchanges so far, and per stage 0..=3 the pointers to its captured
//!   bodies in that day's files under `payloads/`, see `payloads`). Older stores wrote JSON or
//!   stage-less records, with code flow stage -> pointer (or the body itself) beside them,
//!   still read.
//! - `processes`: code -> the day its payload keyspace is, written by older stores; a process
//!   is now found by asking the payload days newest first, and retention empties this.

mod payloads;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use fjall::config::BlockSizePolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::QuotaValues;
use crate::model::{MethodGroup, Role, ServiceName};

/// Days since 1970-01-01 (in whatever timezone the caller means).
pub type Day = i32;

/// One statistics cell as the ledger restores it: user, day, service, method group, counts.
pub type StatsRow = (String, Day, ServiceName, MethodGroup, DayCounts);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Engine(#[from] fjall::Error),
    #[error("store: corrupt record under {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("store: the writer has stopped")]
    WriterGone,
    /// The writer did not get to what was handed over within the wait (it is failing, or far
    /// behind): the caller may try again.
    #[error("store: the writer has not caught up within {0:?}")]
    Behind(std::time::Duration),
    /// The writer's last batch failed (a full disk, say): it keeps the records and tries
    /// again, and waiters are told at once rather than held.
    #[error("store: writing is failing (a full disk?); the log says why")]
    Failing,
    /// Another process (a running `tollgate serve`) holds the store's lock.
    #[error("store: in use by another process (a running tollgate holds its lock)")]
    InUse,
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
    /// After the user last moved to another company, the first of its statistics days that
    /// is wholly the new company's: the day after the move's local date (in the timezone of
    /// the move). None: never moved. A PARTNER of the new company sees the days from it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_days_from: Option<Day>,
}

impl UserRecord {
    /// Moves the user to `company_key`, if it is another company, and notes from which
    /// statistics day on the usage is the new company's. Call it before changing the timezone:
    /// the move's day is in the timezone its last calls were counted in.
    pub fn move_to_company(&mut self, company_key: String) {
        if company_key != self.company_key {
            self.company_key = company_key;
            let local = crate::trace::in_timezone(Utc::now(), self.timezone).date_naive();
            self.company_days_from = Some(day_of_date(local) + 1);
        }
    }
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
    /// The `Content-Encoding` the body was sent with (it is stored coded, as sent).
    pub content_encoding: Option<String>,
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
    /// Sorted by another field than time, more records matched than
    /// [`MAX_SORTED_MATCHES`]: no page was made (the totals hold).
    pub too_many_to_sort: bool,
}

/// The most records a query sorted by another field than time may match: each is read and
/// sorted in memory (a time-sorted page reads only its own records, at any total).
pub const MAX_SORTED_MATCHES: u64 = 250_000;

pub struct Store {
    db: Database,
    users: Keyspace,
    /// Names of removed accounts (the value: when, UTC milliseconds), never given to a new one.
    removed_users: Keyspace,
    stats: Keyspace,
    processes: Keyspace,
    days: Mutex<BTreeMap<String, Keyspace>>,
    /// The writer's counters and record numbers of the days it writes.
    tallies: Mutex<writer::Tallies>,
    /// Where captured bodies are (`payloads`), for reads.
    payloads_dir: PathBuf,
    /// The payload files the writer appends to. Lock order: `tallies`, then this, then `days`.
    payload_files: Mutex<payloads::PayloadFiles>,
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

/// The older audit layout, still read: the bytes after the owner in an index key, and after the
/// tag in a record key: time, code, exchange. The exchange number (1-based, within the process)
/// kept two exchanges of one process that arrive in the same millisecond apart.
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

/// The inline form older stores wrote as the value itself: truncated flag (0 or 1), content
/// type length and bytes, body.
#[cfg(test)]
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

/// Reads the inline form (`encode_payload`).
fn decode_payload(v: &[u8]) -> Option<Payload> {
    let truncated = *v.first()? != 0;
    let ct_len = u16::from_be_bytes([*v.get(1)?, *v.get(2)?]) as usize;
    let ct = v.get(3..3 + ct_len)?;
    Some(Payload {
        content_encoding: None,
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

// ---- audit layout and queries ----

/// One UTC day, and one hour, in milliseconds.
const DAY_MS: i64 = 86_400_000;
const HOUR_MS: u32 = 3_600_000;
/// The hour byte of the counter cells that count a whole day, so that a window of whole days
/// reads a few cells a day rather than 24 times as many.
const WHOLE_DAY: u8 = 24;
/// The first byte of a binary audit or process record; the JSON of older stores starts with `{`.
const BINARY_V1: u8 = 1;
/// The first byte of a process record that also carries its stages' payload pointers (see
/// [`Stages`]); `BINARY_V1` process records left them under `payload_key`s, still read.
const PROCESS_V2: u8 = 3;

/// The payload pointers of one stage of a process, and the exchange that left them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StagePointers {
    exchange: u32,
    input: Option<Vec<u8>>,
    output: Option<Vec<u8>>,
}

/// A process's stages 0..=`MAX_STAGE`, kept in its process record: one write per exchange instead of
/// three (record and two pointers), all under random tracecode keys, which were most of the
/// store writer's time for captured calls.
type Stages = [Option<StagePointers>; crate::trace::MAX_STAGE as usize + 1];

/// Tags in an audit day keyspace. The upper-case ones are the current layout; `r`, `u` and `c`
/// are that of older stores, still read (`legacy_day`) until retention drops their days.
const RECORD: u8 = b'R';
const USER_INDEX: u8 = b'U';
const COMPANY_INDEX: u8 = b'C';
const COUNTER: u8 = b'N';
const OPERATION: u8 = b'O';
const LEGACY_RECORD: u8 = b'r';
const LEGACY_USER_INDEX: u8 = b'u';
const LEGACY_COMPANY_INDEX: u8 = b'c';

/// Counter scopes, one per visibility.
const SCOPE_USER: u8 = b'u';
const SCOPE_COMPANY: u8 = b'c';
const SCOPE_ALL: u8 = b'a';

/// Up to how many visible entries a day's part of a page is read in one pass rather than hour
/// by hour (a handful in tests, so their small days take the hourly path too).
#[cfg(not(test))]
const ONE_PASS_ENTRIES: u64 = 4096;
#[cfg(test)]
const ONE_PASS_ENTRIES: u64 = 4;

/// Whether a counter scope keeps whole-day cells besides the hourly ones. A user's cells are
/// mostly touched by one call each, so a day cell would cost the writer one more write per
/// call for little: a user's day is summed from its few hour cells instead.
fn has_day_cells(scope: u8) -> bool {
    scope != SCOPE_USER
}

/// The bytes that end a counter key: hour, service, method group, operation id.
const COUNTER_TAIL: usize = 1 + 1 + 1 + 4;

/// Options of the audit day keyspaces: larger blocks compress the repetitive records and
/// index entries better, and point reads (a page's records) always hit, so the last level
/// needs no bloom filter.
fn audit_keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .data_block_size_policy(BlockSizePolicy::all(16 * 1024))
        .expect_point_read_hits(true)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(v: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = v.split_first()?;
        *v = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(n);
        }
    }
    None
}

fn take<'a>(v: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    let (head, rest) = (v.get(..len)?, v.get(len..)?);
    *v = rest;
    Some(head)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn take_str(v: &mut &[u8]) -> Option<String> {
    let len = usize::try_from(take_varint(v)?).ok()?;
    String::from_utf8(take(v, len)?.to_vec()).ok()
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

/// What the filters of an audit query look at. Index entries carry it as their value and
/// binary records right after the format byte, so a filtered scan decides without decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Header {
    service: u8,
    group: u8,
    /// The operation's number in its day keyspace (`O` operation -> number).
    operation: u32,
}

impl Header {
    fn write(&self, out: &mut Vec<u8>) {
        out.push(self.service);
        out.push(self.group);
        put_varint(out, u64::from(self.operation));
    }

    fn read(v: &mut &[u8]) -> Option<Header> {
        let service = *take(v, 1)?.first()?;
        let group = *take(v, 1)?.first()?;
        let operation = u32::try_from(take_varint(v)?).ok()?;
        Some(Header {
            service,
            group,
            operation,
        })
    }
}

/// `tag [owner 0x00] ms_of_day seq`: records (`R`, no owner) and visibility index entries
/// (`U` username, `C` company) sort by time within their day. The writer numbers the day's
/// records, so two exchanges of one process in the same millisecond never share a key (they
/// once overwrote each other when time and tracecode were all that told them apart), and the
/// number takes 4 bytes where tracecode and exchange took 20.
fn entry_key(tag: u8, owner: Option<&str>, ms_of_day: u32, seq: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.map_or(0, |o| o.len() + 1) + 9);
    k.push(tag);
    if let Some(o) = owner {
        k.extend_from_slice(o.as_bytes());
        k.push(0);
    }
    k.extend_from_slice(&ms_of_day.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The time within the day and the day's record number an entry key ends with.
fn entry_position(key: &[u8]) -> Option<(u32, u32)> {
    let tail = key.get(key.len().checked_sub(8)?..)?;
    let ms = u32::from_be_bytes(tail[..4].try_into().ok()?);
    let seq = u32::from_be_bytes(tail[4..].try_into().ok()?);
    Some((ms, seq))
}

/// `N scope owner 0x00`: the counter cells of one visibility owner (`a` for everything).
fn counter_prefix(scope: u8, owner: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 3 + COUNTER_TAIL);
    k.push(COUNTER);
    k.push(scope);
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k
}

/// A counter cell: how many records of that owner, hour (or `WHOLE_DAY`), service, method
/// group and operation the day holds.
fn counter_key(out: &mut Vec<u8>, scope: u8, owner: &str, hour: u8, header: Header) {
    out.clear();
    out.push(COUNTER);
    out.push(scope);
    out.extend_from_slice(owner.as_bytes());
    out.push(0);
    out.push(hour);
    out.push(header.service);
    out.push(header.group);
    out.extend_from_slice(&header.operation.to_be_bytes());
}

fn counter_cell(key: &[u8]) -> Option<(u8, Header)> {
    let tail = key.get(key.len().checked_sub(COUNTER_TAIL)?..)?;
    Some((
        tail[0],
        Header {
            service: tail[1],
            group: tail[2],
            operation: u32::from_be_bytes(tail[3..].try_into().ok()?),
        },
    ))
}

fn operation_key(operation: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(operation.len() + 1);
    k.push(OPERATION);
    k.extend_from_slice(operation.as_bytes());
    k
}

fn operation_id_from(v: &[u8]) -> u32 {
    v.try_into().map(u32::from_be_bytes).unwrap_or(u32::MAX)
}

fn corrupt(key: &[u8], reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.into(),
    }
}

/// The binary audit record: format byte, header, then the fields; its time is its key's
/// (day keyspace + milliseconds into the day), so it is not repeated.
fn encode_audit(a: &AuditRecord, header: Header) -> Vec<u8> {
    let mut v = Vec::with_capacity(48 + a.username.len() + a.company_key.len() + a.operation.len());
    v.push(BINARY_V1);
    header.write(&mut v);
    v.extend_from_slice(a.code.as_bytes());
    put_varint(&mut v, zigzag(i64::from(a.timezone)));
    put_varint(&mut v, a.points);
    put_varint(&mut v, a.unique_points);
    put_varint(&mut v, a.duration_us);
    put_varint(&mut v, u64::from(a.status));
    put_str(&mut v, &a.username);
    put_str(&mut v, &a.company_key);
    put_str(&mut v, &a.operation);
    v
}

/// Reads an audit record of either layout: binary, or the JSON older stores wrote.
fn decode_audit(day: Day, key: &[u8], value: &[u8]) -> Result<AuditRecord> {
    if value.first() == Some(&b'{') {
        return decode(key, value);
    }
    decode_binary_audit(day, key, value).ok_or_else(|| corrupt(key, "not an audit record"))
}

/// The header a binary audit record starts with (after its format byte), and the rest.
fn binary_audit_header(value: &[u8]) -> Option<(Header, &[u8])> {
    let (&format, mut rest) = value.split_first()?;
    if format != BINARY_V1 {
        return None;
    }
    Some((Header::read(&mut rest)?, rest))
}

fn decode_binary_audit(day: Day, key: &[u8], value: &[u8]) -> Option<AuditRecord> {
    let (header, mut v) = binary_audit_header(value)?;
    let code = Uuid::from_bytes(take(&mut v, 16)?.try_into().ok()?);
    let timezone = i32::try_from(unzigzag(take_varint(&mut v)?)).ok()?;
    let points = take_varint(&mut v)?;
    let unique_points = take_varint(&mut v)?;
    let duration_us = take_varint(&mut v)?;
    let status = u16::try_from(take_varint(&mut v)?).ok()?;
    let (ms_of_day, _) = entry_position(key)?;
    Some(AuditRecord {
        code,
        username: take_str(&mut v)?,
        company_key: take_str(&mut v)?,
        service: ServiceName::from_code(header.service)?,
        operation: take_str(&mut v)?,
        method_group: MethodGroup::from_code(header.group)?,
        time_ms: day as i64 * DAY_MS + i64::from(ms_of_day),
        timezone,
        points,
        unique_points,
        duration_us,
        status,
    })
}

/// The binary process record: format byte, day, exchanges, owner, company, then each stage
/// that has one: stage number, exchange, input pointer, output pointer (length-prefixed; an
/// empty one is none).
fn encode_process(p: &ProcessRecord, stages: &Stages) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + p.owner.len() + p.company_key.len() + 96);
    v.push(PROCESS_V2);
    v.extend_from_slice(&p.day.to_be_bytes());
    put_varint(&mut v, u64::from(p.exchanges));
    put_str(&mut v, &p.owner);
    put_str(&mut v, &p.company_key);
    for (stage, entry) in stages.iter().enumerate() {
        if let Some(entry) = entry {
            v.push(stage as u8);
            put_varint(&mut v, u64::from(entry.exchange));
            for pointer in [&entry.input, &entry.output] {
                let pointer = pointer.as_deref().unwrap_or_default();
                put_varint(&mut v, pointer.len() as u64);
                v.extend_from_slice(pointer);
            }
        }
    }
    v
}

/// A binary process record's fields, and the bytes after them (the stages, in `PROCESS_V2`).
fn decode_process_binary(value: &[u8]) -> Option<(ProcessRecord, &[u8])> {
    let (&format, mut v) = value.split_first()?;
    if format != BINARY_V1 && format != PROCESS_V2 {
        return None;
    }
    let day = Day::from_be_bytes(take(&mut v, 4)?.try_into().ok()?);
    let exchanges = u32::try_from(take_varint(&mut v)?).ok()?;
    let record = ProcessRecord {
        owner: take_str(&mut v)?,
        company_key: take_str(&mut v)?,
        day,
        exchanges,
    };
    Some((record, v))
}

/// Reads a process record of any layout: binary with or without stages, or the JSON older
/// stores wrote.
fn decode_process(key: &[u8], value: &[u8]) -> Result<ProcessRecord> {
    if value.first() == Some(&b'{') {
        return decode(key, value);
    }
    decode_process_binary(value)
        .map(|(record, _)| record)
        .ok_or_else(|| corrupt(key, "not a process record"))
}

/// The stages a process record carries (none before `PROCESS_V2`). A garbled stage table
/// reads as far as it is whole: its pointers are missing data, not an error.
fn decode_stages(value: &[u8]) -> Stages {
    let mut stages = Stages::default();
    if value.first() != Some(&PROCESS_V2) {
        return stages;
    }
    let Some((_, mut v)) = decode_process_binary(value) else {
        return stages;
    };
    let pointer = |v: &mut &[u8]| -> Option<Option<Vec<u8>>> {
        match usize::try_from(take_varint(v)?).ok()? {
            0 => Some(None),
            len => take(v, len).map(|p| Some(p.to_vec())),
        }
    };
    while let Some((&stage, rest)) = v.split_first() {
        v = rest;
        let entry = (|| {
            let exchange = u32::try_from(take_varint(&mut v)?).ok()?;
            Some(StagePointers {
                exchange,
                input: pointer(&mut v)?,
                output: pointer(&mut v)?,
            })
        })();
        match (stages.get_mut(usize::from(stage)), entry) {
            (Some(slot), Some(entry)) => *slot = Some(entry),
            _ => break,
        }
    }
    stages
}

/// Whose records a query sees: which index it walks and which counter cells it reads.
struct Scope<'q> {
    /// `R` (the records themselves, for everything), `U` or `C`.
    index: u8,
    owner: Option<&'q str>,
    counters: Vec<u8>,
    /// Whether the scope keeps whole-day cells (`has_day_cells`).
    day_cells: bool,
}

impl<'q> Scope<'q> {
    fn of(visibility: &'q Visibility) -> Scope<'q> {
        let (index, scope, owner) = match visibility {
            Visibility::User(u) => (USER_INDEX, SCOPE_USER, Some(u.as_str())),
            Visibility::Company(c) => (COMPANY_INDEX, SCOPE_COMPANY, Some(c.as_str())),
            Visibility::All => (RECORD, SCOPE_ALL, None),
        };
        Scope {
            index,
            owner,
            counters: counter_prefix(scope, owner.unwrap_or("")),
            day_cells: has_day_cells(scope),
        }
    }
}

/// Which operation a query's filter asks for, in one day's numbering.
#[derive(Debug, Clone, Copy)]
enum OperationFilter {
    Any,
    Is(u32),
    /// The day never saw the operation: nothing of it passes.
    Absent,
}

#[derive(Debug, Clone, Copy)]
struct DayFilter {
    service: Option<u8>,
    group: Option<u8>,
    operation: OperationFilter,
}

impl DayFilter {
    fn passes(&self, h: &Header) -> bool {
        self.service.is_none_or(|s| s == h.service)
            && self.group.is_none_or(|g| g == h.group)
            && match self.operation {
                OperationFilter::Any => true,
                OperationFilter::Is(op) => op == h.operation,
                OperationFilter::Absent => false,
            }
    }
}

/// A stretch of a day's window with how many records in it pass the filters.
#[derive(Debug, Clone, Copy)]
struct TimeSlice {
    lo_ms: u32,
    hi_ms: u32,
    matched: u64,
}

/// One day keyspace's part in a query.
struct DayPlan {
    day: Day,
    ks: Keyspace,
    /// The window within the day, in milliseconds since its start.
    lo_ms: u32,
    hi_ms: u32,
    filter: DayFilter,
    /// Visible records in the window, and those of them that pass the filters.
    overall: u64,
    matched: u64,
    /// The window cut into hours (and edge parts) with their filtered counts; filled when
    /// counting needed them or when a page enters the day, empty otherwise.
    slices: Vec<TimeSlice>,
    /// A day with records of the older layout: all its filtered records, in time order.
    legacy: Option<Vec<AuditRecord>>,
}

/// Sums the scope's counter cells of hours `hours` (`WHOLE_DAY` for the whole day): all of
/// them, and those passing the filter, the latter also per hour into `per_hour`.
fn count_cells(
    snap: &Snapshot,
    scope: &Scope,
    plan: &DayPlan,
    hours: std::ops::Range<u8>,
    per_hour: &mut [u64; 25],
) -> Result<(u64, u64)> {
    let mut lo = scope.counters.clone();
    lo.push(hours.start);
    let mut hi = scope.counters.clone();
    hi.push(hours.end);
    let (mut overall, mut matched) = (0, 0);
    for guard in snap.range(&plan.ks, lo..hi) {
        let (k, v) = guard.into_inner()?;
        let (hour, header) = counter_cell(&k).ok_or_else(|| corrupt(&k, "not a counter"))?;
        let n = take_varint(&mut &v[..]).ok_or_else(|| corrupt(&k, "not a count"))?;
        overall += n;
        if plan.filter.passes(&header) {
            matched += n;
            if let Some(slot) = per_hour.get_mut(hour as usize) {
                *slot += n;
            }
        }
    }
    Ok((overall, matched))
}

/// Calls `visit` with the header, key and value of each of the scope's entries in
/// `[lo_ms, hi_ms)` of the day, in time order (reversed if `descending`), while it says so.
fn scan_entries(
    snap: &Snapshot,
    scope: &Scope,
    ks: &Keyspace,
    (lo_ms, hi_ms): (u32, u32),
    descending: bool,
    mut visit: impl FnMut(Header, &[u8], &[u8]) -> Result<bool>,
) -> Result<()> {
    let lo = entry_key(scope.index, scope.owner, lo_ms, 0);
    let hi = entry_key(scope.index, scope.owner, hi_ms, 0);
    let range = snap.range(ks, lo..hi);
    let iter: Box<dyn Iterator<Item = fjall::Guard>> = if descending {
        Box::new(range.rev())
    } else {
        Box::new(range)
    };
    for guard in iter {
        let (k, v) = guard.into_inner()?;
        let mut header_bytes = if scope.index == RECORD {
            v.get(1..).unwrap_or_default()
        } else {
            &v[..]
        };
        let header =
            Header::read(&mut header_bytes).ok_or_else(|| corrupt(&k, "not an audit entry"))?;
        if !visit(header, &k, &v)? {
            break;
        }
    }
    Ok(())
}

/// Counts the entries of a stretch one by one: (all, passing the filter).
fn count_entries(
    snap: &Snapshot,
    scope: &Scope,
    plan: &DayPlan,
    lo_ms: u32,
    hi_ms: u32,
) -> Result<(u64, u64)> {
    let (mut overall, mut matched) = (0, 0);
    scan_entries(snap, scope, &plan.ks, (lo_ms, hi_ms), false, |h, _, _| {
        overall += 1;
        matched += u64::from(plan.filter.passes(&h));
        Ok(true)
    })?;
    Ok((overall, matched))
}

/// Counts a day's part of the window: a whole day from its day cells; otherwise its whole
/// hours from their hour cells and the partial hours at the edges entry by entry. A day whose
/// counters cannot be read (a damaged store; the writer counts them again when it next writes
/// the day) is counted entry by entry.
fn count_day(snap: &Snapshot, scope: &Scope, plan: &mut DayPlan) -> Result<()> {
    match count_day_by_cells(snap, scope, plan) {
        Err(StoreError::Corrupt { key, reason }) => {
            tracing::warn!(
                key,
                reason,
                "an audit counter cannot be read; counting entries"
            );
            let (lo, hi) = (plan.lo_ms, plan.hi_ms);
            (plan.overall, plan.matched) = count_entries(snap, scope, plan, lo, hi)?;
            plan.slices = vec![TimeSlice {
                lo_ms: lo,
                hi_ms: hi,
                matched: plan.matched,
            }];
            Ok(())
        }
        counted => counted,
    }
}

fn count_day_by_cells(snap: &Snapshot, scope: &Scope, plan: &mut DayPlan) -> Result<()> {
    let (lo, hi) = (plan.lo_ms, plan.hi_ms);
    let mut per_hour = [0u64; 25];
    if lo == 0 && hi as i64 == DAY_MS {
        let cells = if scope.day_cells {
            WHOLE_DAY..WHOLE_DAY + 1
        } else {
            0..WHOLE_DAY
        };
        (plan.overall, plan.matched) = count_cells(snap, scope, plan, cells, &mut per_hour)?;
        return Ok(());
    }
    let first_hour = lo.div_ceil(HOUR_MS);
    let end_hour = hi / HOUR_MS;
    if first_hour >= end_hour {
        (plan.overall, plan.matched) = count_entries(snap, scope, plan, lo, hi)?;
        plan.slices = vec![TimeSlice {
            lo_ms: lo,
            hi_ms: hi,
            matched: plan.matched,
        }];
        return Ok(());
    }
    let (mut overall, mut matched) = count_cells(
        snap,
        scope,
        plan,
        first_hour as u8..end_hour as u8,
        &mut per_hour,
    )?;
    let mut slices = Vec::with_capacity(26);
    if lo < first_hour * HOUR_MS {
        let (o, m) = count_entries(snap, scope, plan, lo, first_hour * HOUR_MS)?;
        (overall, matched) = (overall + o, matched + m);
        slices.push(TimeSlice {
            lo_ms: lo,
            hi_ms: first_hour * HOUR_MS,
            matched: m,
        });
    }
    for hour in first_hour..end_hour {
        slices.push(TimeSlice {
            lo_ms: hour * HOUR_MS,
            hi_ms: (hour + 1) * HOUR_MS,
            matched: per_hour[hour as usize],
        });
    }
    if end_hour * HOUR_MS < hi {
        let (o, m) = count_entries(snap, scope, plan, end_hour * HOUR_MS, hi)?;
        (overall, matched) = (overall + o, matched + m);
        slices.push(TimeSlice {
            lo_ms: end_hour * HOUR_MS,
            hi_ms: hi,
            matched: m,
        });
    }
    (plan.overall, plan.matched, plan.slices) = (overall, matched, slices);
    Ok(())
}

/// The page of a time-sorted query: whole days and hours before the offset are skipped by
/// their counts; only the records returned are fetched and decoded.
fn time_page(
    snap: &Snapshot,
    scope: &Scope,
    q: &AuditQuery,
    plans: &mut [DayPlan],
) -> Result<Vec<AuditRecord>> {
    let mut skip = q.offset as u64;
    let mut records = Vec::with_capacity(q.limit.min(1024));
    if q.descending {
        plans.reverse();
    }
    for plan in plans.iter_mut() {
        if records.len() >= q.limit {
            break;
        }
        if plan.matched <= skip {
            skip -= plan.matched;
            continue;
        }
        if let Some(legacy) = &plan.legacy {
            let ordered: Box<dyn Iterator<Item = &AuditRecord>> = if q.descending {
                Box::new(legacy.iter().rev())
            } else {
                Box::new(legacy.iter())
            };
            let wanted = q.limit - records.len();
            records.extend(ordered.skip(skip as usize).take(wanted).cloned());
            skip = 0;
            continue;
        }
        // In a busy day, hours before the offset and hours without a match are skipped by
        // their counts, and the hours left read in as few passes as they allow; a quiet day
        // is read in one pass, cheaper than the seeks of many (each costs one in every table).
        let mut per_hour = [0u64; 25];
        if plan.slices.is_empty()
            && plan.overall > ONE_PASS_ENTRIES
            // Unreadable counters: the day is read in one pass below.
            && count_cells(snap, scope, plan, 0..WHOLE_DAY, &mut per_hour).is_ok()
        {
            plan.slices = (0..u32::from(WHOLE_DAY))
                .map(|hour| TimeSlice {
                    lo_ms: hour * HOUR_MS,
                    hi_ms: (hour + 1) * HOUR_MS,
                    matched: per_hour[hour as usize],
                })
                .collect();
        }
        if plan.slices.is_empty() {
            plan.slices.push(TimeSlice {
                lo_ms: plan.lo_ms,
                hi_ms: plan.hi_ms,
                matched: plan.matched,
            });
        }
        if q.descending {
            plan.slices.reverse();
        }
        let mut spans: Vec<(u32, u32)> = Vec::new();
        for slice in &plan.slices {
            if slice.matched == 0 {
                continue;
            }
            if spans.is_empty() && slice.matched <= skip {
                skip -= slice.matched;
                continue;
            }
            match spans.last_mut() {
                Some(last) if !q.descending && last.1 == slice.lo_ms => last.1 = slice.hi_ms,
                Some(last) if q.descending && last.0 == slice.hi_ms => last.0 = slice.lo_ms,
                _ => spans.push((slice.lo_ms, slice.hi_ms)),
            }
        }
        for span in spans {
            if records.len() >= q.limit {
                break;
            }
            scan_entries(snap, scope, &plan.ks, span, q.descending, |h, k, v| {
                if !plan.filter.passes(&h) {
                    return Ok(true);
                }
                if skip > 0 {
                    skip -= 1;
                    return Ok(true);
                }
                if let Some(record) = fetch_record(snap, scope, plan, k, v)? {
                    records.push(record);
                }
                Ok(records.len() < q.limit)
            })?;
        }
    }
    Ok(records)
}

/// The record an entry stands for: the entry itself when scanning records, else the record
/// its index key points to.
fn fetch_record(
    snap: &Snapshot,
    scope: &Scope,
    plan: &DayPlan,
    key: &[u8],
    value: &[u8],
) -> Result<Option<AuditRecord>> {
    if scope.index == RECORD {
        return decode_audit(plan.day, key, value).map(Some);
    }
    let (ms, seq) = entry_position(key).ok_or_else(|| corrupt(key, "not an index entry"))?;
    let record_key = entry_key(RECORD, None, ms, seq);
    match snap.get(&plan.ks, &record_key)? {
        Some(v) => decode_audit(plan.day, &record_key, &v).map(Some),
        None => Ok(None),
    }
}

/// Every filtered record of the day's window, in time order.
fn day_records(snap: &Snapshot, scope: &Scope, plan: &DayPlan) -> Result<Vec<AuditRecord>> {
    let mut out = Vec::with_capacity(plan.matched.min(1 << 16) as usize);
    scan_entries(
        snap,
        scope,
        &plan.ks,
        (plan.lo_ms, plan.hi_ms),
        false,
        |h, k, v| {
            if plan.filter.passes(&h) {
                out.extend(fetch_record(snap, scope, plan, k, v)?);
            }
            Ok(true)
        },
    )?;
    Ok(out)
}

/// How a query sorted by another field than time orders records.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Text(String),
    Number(u64),
}

/// The page of a query sorted by another field than time: every filtered record of the
/// window is decoded and sorted (ties by time).
fn sorted_page(
    snap: &Snapshot,
    scope: &Scope,
    q: &AuditQuery,
    plans: &[DayPlan],
) -> Result<Vec<AuditRecord>> {
    let mut matched = Vec::new();
    for plan in plans {
        match &plan.legacy {
            Some(records) => matched.extend(records.iter().cloned()),
            None if plan.matched > 0 => matched.extend(day_records(snap, scope, plan)?),
            None => {}
        }
    }
    let key = |r: &AuditRecord| -> (SortKey, i64) {
        let key = match q.sort {
            AuditSort::Username => SortKey::Text(r.username.clone()),
            AuditSort::Service => SortKey::Text(r.service.as_str().into()),
            AuditSort::Operation => SortKey::Text(r.operation.clone()),
            AuditSort::MethodGroup => SortKey::Text(r.method_group.as_str().into()),
            AuditSort::PointsCount => SortKey::Number(r.points),
            AuditSort::Duration => SortKey::Number(r.duration_us),
            AuditSort::Time => SortKey::Number(0),
        };
        (key, r.time_ms)
    };
    matched.sort_by_cached_key(key);
    if q.descending {
        matched.reverse();
    }
    Ok(matched.into_iter().skip(q.offset).take(q.limit).collect())
}

/// A day that holds records of the older layout (JSON records under `r`, empty index
/// entries under `u`/`c`, no counters): everything in its window is read and counted, and
/// this layout's records of the same day with it.
fn legacy_day(snap: &Snapshot, scope: &Scope, q: &AuditQuery, plan: &mut DayPlan) -> Result<()> {
    let mut records = Vec::new();
    let mut overall = 0;
    scan_entries(
        snap,
        scope,
        &plan.ks,
        (plan.lo_ms, plan.hi_ms),
        false,
        |h, k, v| {
            overall += 1;
            if plan.filter.passes(&h) {
                records.extend(fetch_record(snap, scope, plan, k, v)?);
            }
            Ok(true)
        },
    )?;
    let start_ms = plan.day as i64 * DAY_MS;
    let (from_ms, to_ms) = (
        start_ms + i64::from(plan.lo_ms),
        start_ms + i64::from(plan.hi_ms),
    );
    let (lo, hi) = match (scope.index, scope.owner) {
        (USER_INDEX, Some(owner)) => (
            index_key(LEGACY_USER_INDEX, owner, from_ms, &Uuid::nil(), 0),
            index_key(LEGACY_USER_INDEX, owner, to_ms, &Uuid::nil(), 0),
        ),
        (COMPANY_INDEX, Some(owner)) => (
            index_key(LEGACY_COMPANY_INDEX, owner, from_ms, &Uuid::nil(), 0),
            index_key(LEGACY_COMPANY_INDEX, owner, to_ms, &Uuid::nil(), 0),
        ),
        _ => (
            record_key(from_ms, &Uuid::nil(), 0).to_vec(),
            record_key(to_ms, &Uuid::nil(), 0).to_vec(),
        ),
    };
    for guard in snap.range(&plan.ks, lo..hi) {
        let (k, v) = guard.into_inner()?;
        let record = if scope.index == RECORD {
            decode_audit(plan.day, &k, &v)?
        } else {
            let Some(rk) = record_key_of_index(&k) else {
                continue;
            };
            let Some(v) = snap.get(&plan.ks, rk)? else {
                continue;
            };
            decode_audit(plan.day, &rk, &v)?
        };
        overall += 1;
        if q.service.is_some_and(|s| s != record.service)
            || q.method_group.is_some_and(|g| g != record.method_group)
            || q.operation
                .as_deref()
                .is_some_and(|o| o != record.operation)
        {
            continue;
        }
        records.push(record);
    }
    records.sort_by_key(|r| r.time_ms);
    plan.overall = overall;
    plan.matched = records.len() as u64;
    plan.legacy = Some(records);
    Ok(())
}

impl Store {
    /// Opens (or creates) the store at `path`. Fails if another process holds it open.
    pub fn open(path: &Path) -> Result<Arc<Store>> {
        std::fs::create_dir_all(path).map_err(fjall::Error::from)?;
        // Password hashes and every tenant's captured bodies live below: the owner's only,
        // like the signing secret. A folder this process may write but not own (a mounted
        // volume) keeps its mode, with a warning.
        {
            use std::os::unix::fs::PermissionsExt;
            let owner_only = std::fs::Permissions::from_mode(0o700);
            if let Err(e) = std::fs::set_permissions(path, owner_only) {
                tracing::warn!(path = %path.display(), error = %e,
                    "the store folder could not be made owner-only (0700)");
            }
        }
        let db = Database::builder(path)
            .cache_size(64 << 20)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => StoreError::InUse,
                e => StoreError::Engine(e),
            })?;
        let users = db.keyspace("users", KeyspaceCreateOptions::default)?;
        let removed_users = db.keyspace("removed_users", KeyspaceCreateOptions::default)?;
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
        let payloads_dir = path.join("payloads");
        let payload_files = payloads::PayloadFiles::open(payloads_dir.clone())?;
        Ok(Arc::new(Store {
            db,
            users,
            removed_users,
            stats,
            processes,
            days: Mutex::new(days),
            tallies: Mutex::new(writer::Tallies::default()),
            payloads_dir,
            payload_files: Mutex::new(payload_files),
        }))
    }

    fn day_keyspace(&self, prefix: &str, day: Day) -> Result<Keyspace> {
        let name = day_name(prefix, day);
        let mut days = self.days.lock();
        if let Some(ks) = days.get(&name) {
            return Ok(ks.clone());
        }
        // Payload keyspaces hold small pointers now, so new ones need no key-value separation;
        // those made with it by older stores keep it (fjall stores a keyspace's options).
        let ks = if prefix == "payload" {
            self.db.keyspace(&name, KeyspaceCreateOptions::default)?
        } else {
            self.db.keyspace(&name, audit_keyspace_options)?
        };
        days.insert(name, ks.clone());
        Ok(ks)
    }

    /// Makes everything written so far durable (fsync): payload files first, so that no
    /// pointer made durable names bytes that are not.
    pub fn sync(&self) -> Result<()> {
        self.payload_files.lock().sync()?;
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

    /// Removes an account. Its name stays taken: the audit, captures and statistics of the
    /// account stay under it, and a new account of that name would read them as its own.
    pub fn remove_user(&self, username: &str) -> Result<bool> {
        if !self.users.contains_key(username)? {
            return Ok(false);
        }
        let mut batch = self.db.batch();
        batch.remove(&self.users, username);
        batch.insert(
            &self.removed_users,
            username,
            Utc::now().timestamp_millis().to_be_bytes(),
        );
        batch.commit()?;
        self.sync()?;
        Ok(true)
    }

    /// Whether `username` was the name of an account removed since.
    pub fn was_removed(&self, username: &str) -> Result<bool> {
        Ok(self.removed_users.contains_key(username)?)
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
    pub fn stats_since(&self, since: Day) -> Result<Vec<StatsRow>> {
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

    /// The payload keyspace of a process's day and its process record as stored: the payload
    /// days are asked newest first, each a memtable lookup and a bloom filter per table for a
    /// day that does not hold it. Finding a process is rare (the data API, a follow-up after a
    /// restart), while an index of code -> day cost every captured call a write at a random
    /// key; stores that wrote that index (`processes`) read the same way.
    fn process_entry(&self, code: &Uuid) -> Result<Option<(Keyspace, fjall::Slice)>> {
        let newest_first: Vec<Keyspace> = self
            .days
            .lock()
            .range::<str, _>((
                std::ops::Bound::Included("payload_"),
                std::ops::Bound::Excluded("payload`"),
            ))
            .rev()
            .map(|(_, ks)| ks.clone())
            .collect();
        let key = process_key(code);
        for ks in newest_first {
            if let Some(record) = ks.get(key)? {
                return Ok(Some((ks, record)));
            }
        }
        Ok(None)
    }

    pub fn process(&self, code: &Uuid) -> Result<Option<ProcessRecord>> {
        match self.process_entry(code)? {
            Some((_, record)) => Ok(Some(decode_process(code.as_bytes(), &record)?)),
            None => Ok(None),
        }
    }

    pub fn payload(&self, code: &Uuid, flow: Flow, stage: u8) -> Result<Option<Payload>> {
        let Some((ks, record)) = self.process_entry(code)? else {
            return Ok(None);
        };
        let process = decode_process(code.as_bytes(), &record)?;
        let stages = decode_stages(&record);
        let value = match stages.get(usize::from(stage)) {
            Some(Some(entry)) => match flow {
                Flow::Input => entry.input.clone(),
                Flow::Output => entry.output.clone(),
            },
            // Not in the record: where stores before `PROCESS_V2` put it.
            _ => ks.get(payload_key(code, flow, stage))?.map(|v| v.to_vec()),
        };
        let Some(v) = value else {
            return Ok(None);
        };
        if v.first() != Some(&payloads::POINTER_V1) {
            return Ok(decode_payload(&v));
        }
        // A garbled pointer, like a garbled inline value, is missing data rather than an error.
        let Some(pointer) = payloads::Pointer::decode(&v) else {
            return Ok(None);
        };
        Ok(
            payloads::read(&self.payloads_dir, process.day, &pointer)?.map(|body| Payload {
                content_encoding: pointer.content_encoding,
                content_type: pointer.content_type,
                truncated: pointer.truncated,
                body,
            }),
        )
    }

    // ---- audit ----

    /// A page of audit records visible to the caller, with the totals the API reports.
    ///
    /// Totals come from the day keyspaces' counter cells (whole days, then whole hours), with
    /// only the partial hours at the window's edges counted entry by entry; a time-sorted page
    /// skips whole days and hours by those counts and decodes only the records it returns.
    /// Everything is read from one snapshot, so the totals always agree with the page.
    pub fn audit(&self, q: &AuditQuery) -> Result<AuditPage> {
        self.audit_sorting_at_most(q, MAX_SORTED_MATCHES)
    }

    fn audit_sorting_at_most(&self, q: &AuditQuery, max_sorted: u64) -> Result<AuditPage> {
        let scope = Scope::of(&q.visibility);
        let snap = self.db.snapshot();
        let mut plans = self.plan_days(&snap, q, &scope)?;
        let mut page = AuditPage {
            records: Vec::new(),
            overall_total: plans.iter().map(|p| p.overall).sum(),
            filter_total: plans.iter().map(|p| p.matched).sum(),
            too_many_to_sort: false,
        };
        if q.sort == AuditSort::Time {
            page.records = time_page(&snap, &scope, q, &mut plans)?;
        } else if page.filter_total > max_sorted {
            page.too_many_to_sort = true;
        } else {
            page.records = sorted_page(&snap, &scope, q, &plans)?;
        }
        Ok(page)
    }

    /// The audit days inside the query's window, oldest first, each with its totals counted.
    fn plan_days(&self, snap: &Snapshot, q: &AuditQuery, scope: &Scope) -> Result<Vec<DayPlan>> {
        if q.from_ms >= q.to_ms {
            return Ok(Vec::new());
        }
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
        let mut plans = Vec::with_capacity(days.len());
        for (day, ks) in days {
            let start_ms = day as i64 * DAY_MS;
            let clip = |t: i64| t.saturating_sub(start_ms).clamp(0, DAY_MS) as u32;
            let (lo_ms, hi_ms) = (clip(q.from_ms), clip(q.to_ms));
            if lo_ms >= hi_ms {
                continue;
            }
            let operation = match &q.operation {
                None => OperationFilter::Any,
                Some(op) => match snap.get(&ks, operation_key(op))? {
                    Some(id) => OperationFilter::Is(operation_id_from(&id)),
                    None => OperationFilter::Absent,
                },
            };
            let mut plan = DayPlan {
                day,
                ks,
                lo_ms,
                hi_ms,
                filter: DayFilter {
                    service: q.service.map(ServiceName::code),
                    group: q.method_group.map(MethodGroup::code),
                    operation,
                },
                overall: 0,
                matched: 0,
                slices: Vec::new(),
                legacy: None,
            };
            if snap.prefix(&plan.ks, [LEGACY_RECORD]).next().is_some() {
                legacy_day(snap, scope, q, &mut plan)?;
            } else {
                count_day(snap, scope, &mut plan)?;
            }
            plans.push(plan);
        }
        Ok(plans)
    }

    // ---- retention ----

    /// Drops whole day keyspaces older than the retention: payloads before `payload_before`
    /// (with their payload files), audit before `audit_before` (UTC days). Statistics stay.
    /// Returns how many keyspaces were dropped.
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
            if let Some(day) = name
                .strip_prefix("audit_")
                .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
            {
                self.tallies.lock().forget(day_of_date(day));
            }
            self.db.delete_keyspace(ks.clone())?;
        }
        if doomed.iter().any(|(name, _)| name.starts_with("payload_")) {
            self.forget_processes_before(payload_before)?;
        }
        // After the pointers are gone; also catches the files of a day whose keyspace went
        // just before a crash.
        self.payload_files
            .lock()
            .delete_days_before(payload_before)?;
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
            self.removed_users.clone(),
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

    /// Bytes on disk (key-value store and payload files), for the metrics and the sizing bench.
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0) + payloads::disk_bytes(&self.payloads_dir)
    }

    /// Bytes on disk of the audit day keyspaces alone (records, indexes, counters), for the
    /// sizing bench.
    pub fn audit_disk_bytes(&self) -> u64 {
        self.days
            .lock()
            .iter()
            .filter(|(name, _)| name.starts_with("audit_"))
            .map(|(_, ks)| ks.disk_space())
            .sum()
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
            content_encoding: None,
            content_type: Some("application/json".into()),
            truncated: true,
            body: bytes::Bytes::from_static(b"{\"a\":1}"),
        };
        assert_eq!(decode_payload(&encode_payload(&p)), Some(p));
        let bare = Payload {
            content_encoding: None,
            content_type: None,
            truncated: false,
            body: bytes::Bytes::new(),
        };
        assert_eq!(decode_payload(&encode_payload(&bare)), Some(bare));
        assert_eq!(decode_payload(&[1]), None);
    }

    use std::time::Duration;
    use writer::{CallRecord, StoreWriter};

    #[test]
    fn a_held_record_is_due_by_its_answer_time_or_by_when_it_was_taken() {
        let now = chrono::Utc::now().timestamp_millis();
        let mut due = writer::Due::default();
        assert!(!due.is_due(Duration::ZERO), "nothing held is never due");
        // Answered 90 ms ago (the call took 1.5 ms of that), taken just now.
        due.hold(&call("alice", now - 92, Uuid::new_v4(), 1, 0));
        assert!(due.is_due(Duration::from_millis(75)));
        assert!(!due.is_due(Duration::from_secs(10)));
        // A younger record does not make the oldest younger.
        due.hold(&call("alice", now, Uuid::new_v4(), 1, 0));
        assert!(due.is_due(Duration::from_millis(75)));
        // Answered "later than now" (the wall clock was set back): due by when it was taken.
        let mut due = writer::Due::default();
        due.hold(&call("alice", now + 3_600_000, Uuid::new_v4(), 1, 0));
        assert!(!due.is_due(Duration::from_millis(30)));
        std::thread::sleep(Duration::from_millis(40));
        assert!(due.is_due(Duration::from_millis(30)));
    }

    fn call(
        username: &str,
        time_ms: i64,
        code: Uuid,
        exchanges: u32,
        charged_day: Day,
    ) -> CallRecord {
        CallRecord {
            findable: true,
            anonymous: false,
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
                content_encoding: None,
                content_type: Some("application/json".into()),
                truncated: false,
                body: bytes::Bytes::from_static(br#"{"locations":[1,2,3]}"#),
            }),
            output: None,
            charged_day: Some(charged_day),
        }
    }

    fn everything(username: &str) -> AuditQuery {
        everything_seen_by(Visibility::User(username.into()))
    }

    fn everything_seen_by(visibility: Visibility) -> AuditQuery {
        AuditQuery {
            visibility,
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
        writer
            .flush_blocking(std::time::Duration::from_secs(60))
            .unwrap();
        drop(writer);
        handle.join().unwrap();
    }

    #[test]
    fn a_call_nobody_can_look_up_leaves_its_audit_and_statistics_but_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        let (kept, bare) = (Uuid::new_v4(), Uuid::new_v4());
        let mut unfindable = call("alice", now, bare, 1, day_of_ms(now));
        unfindable.findable = false;
        unfindable.input = None;
        write(
            &store,
            vec![call("alice", now, kept, 1, day_of_ms(now)), unfindable],
        );
        assert!(store.process(&kept).unwrap().is_some());
        assert_eq!(store.process(&bare).unwrap(), None);
        let page = store.audit(&everything("alice")).unwrap();
        let codes: Vec<Uuid> = page.records.iter().map(|r| r.code).collect();
        assert_eq!(codes, vec![kept, bare]);
        let today = store
            .day_counts(
                "alice",
                day_of_ms(now),
                ServiceName::UNIVERSAL,
                MethodGroup::PLAN,
            )
            .unwrap();
        assert_eq!(today.points, 6, "both calls are charged");
    }

    #[test]
    fn a_query_sorted_by_another_field_than_time_reads_a_bounded_number_of_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        write(
            &store,
            (0..3)
                .map(|_| call("alice", now, Uuid::new_v4(), 1, day_of_ms(now)))
                .collect(),
        );
        let mut q = everything("alice");
        q.sort = AuditSort::PointsCount;
        let page = store.audit_sorting_at_most(&q, 3).unwrap();
        assert_eq!((page.records.len(), page.too_many_to_sort), (3, false));
        let page = store.audit_sorting_at_most(&q, 2).unwrap();
        assert!(page.too_many_to_sort);
        assert!(page.records.is_empty());
        assert_eq!((page.overall_total, page.filter_total), (3, 3));
        // Sorted by time, any number.
        q.sort = AuditSort::Time;
        let page = store.audit_sorting_at_most(&q, 2).unwrap();
        assert_eq!((page.records.len(), page.too_many_to_sort), (3, false));
    }

    #[test]
    fn a_day_whose_counter_cannot_be_read_is_counted_again_and_written_on() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now().timestamp_millis();
        let day = day_of_ms(now);
        let codes: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            write(
                &store,
                (0..4)
                    .map(|i| call(if i == 3 { "bob" } else { "alice" }, now, codes[i], 1, day))
                    .collect(),
            );
            // Damage the day's whole-day count of everything: a varint cut short.
            let audit = store.day_keyspace("audit", day).unwrap();
            let everything = counter_prefix(SCOPE_ALL, "");
            let damaged = audit
                .prefix(&everything)
                .map(|g| g.key().unwrap().to_vec())
                .find(|k| counter_cell(k).is_some_and(|(hour, _)| hour == WHOLE_DAY))
                .expect("a whole-day cell");
            audit.insert(&damaged, [0x80u8]).unwrap();
        }
        // After a restart readers count the day's entries instead of its damaged counters...
        let store = Store::open(dir.path()).unwrap();
        let page = store.audit(&everything_seen_by(Visibility::All)).unwrap();
        assert_eq!((page.overall_total, page.records.len()), (4, 4));
        assert_eq!(store.audit(&everything("bob")).unwrap().overall_total, 1);
        // ...and the writer counts the records again instead of failing every batch, and
        // numbers the new records after the old ones.
        write(
            &store,
            vec![
                call("alice", now, codes[4], 1, day),
                call("alice", now, codes[5], 1, day),
            ],
        );
        let page = store.audit(&everything_seen_by(Visibility::All)).unwrap();
        let mut seen: Vec<Uuid> = page.records.iter().map(|r| r.code).collect();
        seen.sort();
        let mut want = codes.clone();
        want.sort();
        assert_eq!(seen, want, "no record overwritten or lost");
        assert_eq!(page.overall_total, 6);
        assert_eq!(store.audit(&everything("alice")).unwrap().overall_total, 5);
        assert_eq!(store.audit(&everything("bob")).unwrap().overall_total, 1);
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
            // The code -> day index older stores wrote beside each process.
            for (code, day) in codes.iter().zip([ancient, old, recent]) {
                store
                    .processes
                    .insert(code.as_bytes(), day_key(day))
                    .unwrap();
            }
            assert_eq!(store.audit(&everything("alice")).unwrap().records.len(), 3);
            for code in &codes {
                assert!(
                    store.process(code).unwrap().is_some(),
                    "found on its own day, whichever days are newer"
                );
            }
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
                    "the index older stores wrote forgets dropped days too"
                );
            }
            assert!(store.processes.contains_key(codes[2].as_bytes()).unwrap());
            assert!(store.process(&codes[2]).unwrap().is_some());
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

    #[test]
    fn binary_records_round_trip_and_reject_garbage() {
        let a = call("bob", 1_700_000_123_456, Uuid::new_v4(), 1, 0).audit;
        let a = AuditRecord {
            timezone: -11,
            status: 503,
            duration_us: u64::MAX,
            ..a
        };
        let day = day_of_ms(a.time_ms);
        let key = entry_key(RECORD, None, (a.time_ms - day as i64 * DAY_MS) as u32, 7);
        let header = Header {
            service: a.service.code(),
            group: a.method_group.code(),
            operation: 300,
        };
        let v = encode_audit(&a, header);
        assert_eq!(decode_audit(day, &key, &v).unwrap(), a);
        assert_eq!(Header::read(&mut &v[1..]), Some(header));
        assert!(decode_audit(day, &key, &v[..v.len() - 1]).is_err());
        assert!(decode_audit(day, &key, &[2, 0, 0]).is_err());
        let json = serde_json::to_vec(&a).unwrap();
        assert_eq!(decode_audit(day, &key, &json).unwrap(), a);
        let p = ProcessRecord {
            owner: "bob".into(),
            company_key: "acme".into(),
            day: -3,
            exchanges: 9,
        };
        assert_eq!(decode_process(b"p", &encode_process_v1(&p)).unwrap(), p);
        assert_eq!(decode_stages(&encode_process_v1(&p)), Stages::default());
        let mut stages = Stages::default();
        stages[0] = Some(StagePointers {
            exchange: 1,
            input: Some(vec![2, 0, 1, 2, 3]),
            output: None,
        });
        stages[3] = Some(StagePointers {
            exchange: 7,
            input: None,
            output: Some(vec![2; 40]),
        });
        let v2 = encode_process(&p, &stages);
        assert_eq!(decode_process(b"p", &v2).unwrap(), p);
        assert_eq!(decode_stages(&v2), stages);
        // A torn stage table keeps the stages that are whole.
        let torn = decode_stages(&v2[..v2.len() - 1]);
        assert_eq!(torn[0], stages[0]);
        assert_eq!(torn[3], None);
        let json = serde_json::to_vec(&p).unwrap();
        assert_eq!(decode_process(b"p", &json).unwrap(), p);
        assert_eq!(decode_stages(&json), Stages::default());
        assert!(decode_process(b"p", &[1, 0]).is_err());
    }

    /// A process record as stores before `PROCESS_V2` wrote it, without stages.
    fn encode_process_v1(p: &ProcessRecord) -> Vec<u8> {
        let mut v = vec![BINARY_V1];
        v.extend_from_slice(&p.day.to_be_bytes());
        put_varint(&mut v, u64::from(p.exchanges));
        put_str(&mut v, &p.owner);
        put_str(&mut v, &p.company_key);
        v
    }

    /// What a query must answer, computed the slow obvious way from the records written
    /// (in writing order, which breaks ties of time).
    fn brute_force(written: &[AuditRecord], q: &AuditQuery) -> (Vec<AuditRecord>, u64, u64) {
        let visible: Vec<&AuditRecord> = written
            .iter()
            .filter(|r| (q.from_ms..q.to_ms).contains(&r.time_ms))
            .filter(|r| match &q.visibility {
                Visibility::User(u) => &r.username == u,
                Visibility::Company(c) => &r.company_key == c,
                Visibility::All => true,
            })
            .collect();
        let mut matched: Vec<AuditRecord> = visible
            .iter()
            .filter(|r| q.service.is_none_or(|s| s == r.service))
            .filter(|r| q.method_group.is_none_or(|g| g == r.method_group))
            .filter(|r| q.operation.as_ref().is_none_or(|o| o == &r.operation))
            .map(|r| (*r).clone())
            .collect();
        matched.sort_by_key(|r| r.time_ms);
        let field = |r: &AuditRecord| -> (String, u64) {
            match q.sort {
                AuditSort::Time => (String::new(), 0),
                AuditSort::Username => (r.username.clone(), 0),
                AuditSort::Service => (r.service.to_string(), 0),
                AuditSort::Operation => (r.operation.clone(), 0),
                AuditSort::MethodGroup => (r.method_group.to_string(), 0),
                AuditSort::PointsCount => (String::new(), r.points),
                AuditSort::Duration => (String::new(), r.duration_us),
            }
        };
        matched.sort_by_key(|r| (field(r), r.time_ms));
        if q.descending {
            matched.reverse();
        }
        let total = matched.len() as u64;
        let page = matched.into_iter().skip(q.offset).take(q.limit).collect();
        (page, visible.len() as u64, total)
    }

    /// A fixed UTC day (2024-09-13) so the hours of the generated records do not depend on
    /// when the test runs.
    const BASE_DAY: Day = 19_979;
    const USERS: [&str; 3] = ["ann", "ben", "cy"];
    const OPERATIONS: [&str; 3] = ["run_plan", "run_matrix", "run_route"];
    const SORTS: [AuditSort; 7] = [
        AuditSort::Time,
        AuditSort::Time,
        AuditSort::Username,
        AuditSort::Operation,
        AuditSort::MethodGroup,
        AuditSort::PointsCount,
        AuditSort::Duration,
    ];

    /// A record from random numbers: three days from `BASE_DAY`, clustered times so that
    /// several share a millisecond, and few users, services, groups and operations so that
    /// every filter both keeps and drops records.
    fn generated(n: u64, r: u64) -> AuditRecord {
        let user = USERS[(r % 3) as usize];
        let time_ms = BASE_DAY as i64 * DAY_MS + ((r >> 8) % (3 * DAY_MS as u64)) as i64 / 7 * 7;
        AuditRecord {
            code: Uuid::from_u64_pair(n, r),
            username: user.into(),
            company_key: if user == "cy" { "beta" } else { "acme" }.into(),
            service: ServiceName::ALL[((r >> 2) % 2) as usize],
            operation: OPERATIONS[((r >> 4) % 3) as usize].into(),
            method_group: MethodGroup::ALL[((r >> 6) % 2) as usize],
            time_ms,
            timezone: 3,
            points: (r >> 50) % 5,
            unique_points: 1,
            duration_us: (r >> 40) % 7,
            status: 200,
        }
    }

    /// A bound of a query window: on an hour, or anywhere, around the generated days.
    fn bound(r: u64) -> i64 {
        let span = 4 * DAY_MS as u64;
        let t = (BASE_DAY - 1) as i64 * DAY_MS + ((r >> 3) % span) as i64;
        match r % 4 {
            0 => t - t.rem_euclid(HOUR_MS as i64),
            1 => t - t.rem_euclid(DAY_MS),
            _ => t,
        }
    }

    fn generated_query(r: [u64; 4]) -> AuditQuery {
        let (a, b) = (bound(r[0]), bound(r[1]));
        let pick = |bits: u64, n: u64| (bits % (n + 1)) as usize;
        AuditQuery {
            visibility: match r[2] % 3 {
                0 => Visibility::User(USERS[pick(r[2] >> 2, 2) % 3].into()),
                1 => Visibility::Company(["acme", "beta", "nobody"][pick(r[2] >> 4, 2) % 3].into()),
                _ => Visibility::All,
            },
            from_ms: a.min(b),
            to_ms: if r[3].is_multiple_of(9) {
                a.min(b)
            } else {
                a.max(b)
            },
            service: (r[2] >> 8 & 1 == 1).then(|| ServiceName::ALL[((r[2] >> 9) % 2) as usize]),
            method_group: (r[2] >> 10 & 1 == 1)
                .then(|| MethodGroup::ALL[((r[2] >> 11) % 2) as usize]),
            operation: match (r[2] >> 12) % 5 {
                0..=2 => None,
                3 => Some("never_called".into()),
                n => Some(OPERATIONS[(n as usize + (r[2] >> 20) as usize) % 3].into()),
            },
            sort: SORTS[((r[3] >> 4) % 7) as usize],
            descending: r[3] >> 8 & 1 == 1,
            offset: [0, 0, 1, 5, 30][((r[3] >> 9) % 5) as usize],
            limit: [1, 7, 100][((r[3] >> 12) % 3) as usize],
        }
    }

    fn check(store: &Store, written: &[AuditRecord], q: &AuditQuery) {
        let page = store.audit(q).unwrap();
        let (records, overall, filtered) = brute_force(written, q);
        assert_eq!(page.overall_total, overall, "overall total of {q:?}");
        assert_eq!(page.filter_total, filtered, "filter total of {q:?}");
        assert_eq!(page.records, records, "page of {q:?}");
    }

    fn audit_call(a: AuditRecord) -> CallRecord {
        CallRecord {
            findable: true,
            anonymous: false,
            process: ProcessRecord {
                owner: a.username.clone(),
                company_key: a.company_key.clone(),
                day: day_of_ms(a.time_ms),
                exchanges: 1,
            },
            stage: 0,
            input: None,
            output: None,
            charged_day: None,
            audit: a,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Pages and totals of every visibility, filter, sort and window (on and off hour
        /// boundaries, whole days and parts) equal the brute-force answer, also across two
        /// batches of the writer (the second continuing the first's counts).
        #[test]
        fn audit_pages_and_totals_equal_brute_force(
            seeds in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..400),
            queries in proptest::collection::vec(proptest::prelude::any::<[u64; 4]>(), 40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let mut written: Vec<AuditRecord> =
                seeds.iter().enumerate().map(|(n, r)| generated(n as u64, *r)).collect();
            // Records of a day arrive roughly, not exactly, in time order.
            written.sort_by_key(|r| r.time_ms / 3_000_000);
            let half = written.len() / 2;
            write(&store, written[..half].iter().cloned().map(audit_call).collect());
            write(&store, written[half..].iter().cloned().map(audit_call).collect());
            // Ties of time are broken by writing order, which the brute force keeps by a
            // stable sort.
            for r in queries {
                check(&store, &written, &generated_query(r));
            }
        }
    }

    #[test]
    fn calls_without_a_token_are_in_the_everything_view_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let named = generated(0, mix(0));
        let mut anonymous = generated(1, mix(1));
        anonymous.username = crate::trace::ANONYMOUS.into();
        anonymous.company_key = crate::trace::ANONYMOUS.into();
        write(
            &store,
            vec![
                audit_call(named.clone()),
                CallRecord {
                    anonymous: true,
                    ..audit_call(anonymous.clone())
                },
            ],
        );
        let query = everything_seen_by;
        let all = store.audit(&query(Visibility::All)).unwrap();
        assert_eq!((all.overall_total, all.records.len()), (2, 2));
        assert!(all.records.contains(&anonymous));
        for nobody in [
            Visibility::User(crate::trace::ANONYMOUS.into()),
            Visibility::Company(crate::trace::ANONYMOUS.into()),
        ] {
            let page = store.audit(&query(nobody.clone())).unwrap();
            assert_eq!(
                (page.overall_total, page.records.len()),
                (0, 0),
                "{nobody:?}"
            );
        }
        let own = store
            .audit(&query(Visibility::User(named.username.clone())))
            .unwrap();
        assert_eq!((own.overall_total, own.records), (1, vec![named]));
    }

    #[test]
    fn counters_survive_a_restart_and_keep_counting() {
        let dir = tempfile::tempdir().unwrap();
        let written: Vec<AuditRecord> = (0..300).map(|n| generated(n, mix(n))).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            write(
                &store,
                written[..150].iter().cloned().map(audit_call).collect(),
            );
        }
        let store = Store::open(dir.path()).unwrap();
        write(
            &store,
            written[150..].iter().cloned().map(audit_call).collect(),
        );
        for n in 0..200 {
            let r = [mix(n + 1000), mix(n + 2000), mix(n + 3000), mix(n + 4000)];
            check(&store, &written, &generated_query(r));
        }
    }

    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    #[test]
    fn days_written_by_the_older_layout_still_read_with_newer_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let written: Vec<AuditRecord> = (0..120).map(|n| generated(n, mix(n))).collect();
        // The first 60 as an older store wrote them: JSON records and empty index entries.
        for (n, a) in written[..60].iter().enumerate() {
            let ks = store.day_keyspace("audit", day_of_ms(a.time_ms)).unwrap();
            let exchange = n as u32 + 1;
            ks.insert(record_key(a.time_ms, &a.code, exchange), encode(a))
                .unwrap();
            for (tag, owner) in [(b'u', &a.username), (b'c', &a.company_key)] {
                ks.insert(index_key(tag, owner, a.time_ms, &a.code, exchange), b"")
                    .unwrap();
            }
        }
        write(
            &store,
            written[60..].iter().cloned().map(audit_call).collect(),
        );
        let mut by_time = written.clone();
        by_time.sort_by_key(|r| r.time_ms);
        for n in 0..200 {
            let r = [mix(n + 1000), mix(n + 2000), mix(n + 3000), mix(n + 4000)];
            let q = generated_query(r);
            // Within a millisecond the older layout orders by tracecode, not by writing:
            // compare the totals and the order of times only.
            let page = store.audit(&q).unwrap();
            let (records, overall, filtered) = brute_force(&by_time, &q);
            assert_eq!(
                (page.overall_total, page.filter_total),
                (overall, filtered),
                "{q:?}"
            );
            let mut got = page.records.clone();
            let mut want = records.clone();
            got.sort_by_key(|r| r.code);
            want.sort_by_key(|r| r.code);
            if q.sort == AuditSort::Time && !brute_ties(&by_time, &q) {
                assert_eq!(page.records, records, "{q:?}");
            } else {
                assert_eq!(got.len(), want.len(), "{q:?}");
            }
        }
        // A process record an older store wrote as JSON still reads.
        let code = Uuid::new_v4();
        let p = ProcessRecord {
            owner: "ann".into(),
            company_key: "acme".into(),
            day: BASE_DAY,
            exchanges: 2,
        };
        store
            .processes
            .insert(code.as_bytes(), day_key(BASE_DAY))
            .unwrap();
        let payloads = store.day_keyspace("payload", BASE_DAY).unwrap();
        payloads.insert(process_key(&code), encode(&p)).unwrap();
        assert_eq!(store.process(&code).unwrap(), Some(p));
    }

    /// A call with an input and an output body of `len_bytes` each, distinct per `n`.
    fn call_with_bodies(n: u64, time_ms: i64, len_bytes: usize) -> CallRecord {
        let body = |flow: u64| -> bytes::Bytes {
            let mut b = format!("{{\"call\":{n},\"flow\":{flow},\"pad\":\"").into_bytes();
            b.extend((0..len_bytes).map(|i| b'a' + (mix(n * 2 + flow + i as u64) % 26) as u8));
            b.truncate(len_bytes);
            b.into()
        };
        CallRecord {
            input: Some(Payload {
                content_encoding: None,
                content_type: Some("application/json".into()),
                truncated: false,
                body: body(0),
            }),
            output: Some(Payload {
                content_encoding: None,
                content_type: None,
                truncated: true,
                body: body(1),
            }),
            ..call(
                "alice",
                time_ms,
                Uuid::from_u64_pair(n, 7),
                1,
                day_of_ms(time_ms),
            )
        }
    }

    fn read_back(store: &Store, c: &CallRecord) -> (Option<Payload>, Option<Payload>) {
        let code = &c.audit.code;
        (
            store.payload(code, Flow::Input, c.stage).unwrap(),
            store.payload(code, Flow::Output, c.stage).unwrap(),
        )
    }

    /// The call's captured bodies read back as written.
    fn assert_reads_back(store: &Store, c: &CallRecord) {
        assert_eq!(read_back(store, c), (c.input.clone(), c.output.clone()));
    }

    /// The payload files' names, sorted.
    fn payload_file_names(store_dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(store_dir.join("payloads"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn payloads_read_back_after_a_reopen_and_a_reopened_store_appends_to_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now().timestamp_millis();
        let first: Vec<CallRecord> = (0..20).map(|n| call_with_bodies(n, now, 10_000)).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            write(&store, first.clone());
            assert_eq!(payload_file_names(dir.path()).len(), 1);
        }
        let store = Store::open(dir.path()).unwrap();
        for c in &first {
            assert_reads_back(&store, c);
        }
        let first_file = payload_file_names(dir.path());
        let first_len = store.disk_bytes();
        let second: Vec<CallRecord> = (20..30).map(|n| call_with_bodies(n, now, 3_000)).collect();
        write(&store, second.clone());
        let files = payload_file_names(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files.contains(&first_file[0]));
        assert!(store.disk_bytes() > first_len);
        for c in first.iter().chain(&second) {
            assert_reads_back(&store, c);
        }
        // The bodies are in the files, not in the key-value store.
        let ks = store.day_keyspace("payload", day_of_ms(now)).unwrap();
        let record = ks.get(process_key(&first[0].audit.code)).unwrap().unwrap();
        let v = decode_stages(&record)[0].clone().unwrap().input.unwrap();
        assert_eq!(v.first(), Some(&payloads::POINTER_V1));
        assert!(v.len() < 64, "a pointer of {} bytes", v.len());
        assert!(
            record.len() < 160,
            "a process record of {} bytes",
            record.len()
        );
    }

    #[test]
    fn each_stage_keeps_the_bodies_of_the_latest_exchange_that_reached_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        let code = Uuid::new_v4();
        let exchange = |n: u32| {
            let mut c = call_with_bodies(u64::from(n), now + i64::from(n), 500 + n as usize);
            c.audit.code = code;
            c.process.exchanges = n;
            c.stage = crate::trace::stage_of(n - 1);
            c
        };
        let mut last = exchange(6);
        last.output = None;
        let calls: Vec<CallRecord> = (1..=5).map(exchange).chain([last]).collect();
        // Finishing out of order, within a batch and across two.
        let order = |ns: &[usize]| ns.iter().map(|&n| calls[n - 1].clone()).collect();
        write(&store, order(&[2, 1, 3]));
        write(&store, order(&[6, 4, 5]));
        assert_eq!(store.process(&code).unwrap().unwrap().exchanges, 6);
        for n in [1, 2, 3, 6] {
            assert_reads_back(&store, &calls[n - 1]);
        }
        // Stage 3's output went with exchange 6, which had none: not exchange 5's left over.
        assert_eq!(store.payload(&code, Flow::Output, 3).unwrap(), None);
        // One record holds it all: the process is one key, its bodies in the files.
        let ks = store.day_keyspace("payload", day_of_ms(now)).unwrap();
        assert_eq!(ks.iter().count(), 1);
    }

    #[test]
    fn payloads_stored_inline_by_older_stores_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now().timestamp_millis();
        let old = call_with_bodies(1, now, 2_000);
        let code = old.audit.code;
        // As an older store wrote it: process record and the bodies themselves.
        store
            .processes
            .insert(code.as_bytes(), day_key(old.process.day))
            .unwrap();
        let ks = store.day_keyspace("payload", old.process.day).unwrap();
        ks.insert(process_key(&code), encode_process_v1(&old.process))
            .unwrap();
        for (flow, p) in [(Flow::Input, &old.input), (Flow::Output, &old.output)] {
            ks.insert(
                payload_key(&code, flow, 0),
                encode_payload(p.as_ref().unwrap()),
            )
            .unwrap();
        }
        // Newer calls of the same day go to the files, side by side with the older ones.
        let new = call_with_bodies(2, now, 2_000);
        write(&store, vec![new.clone()]);
        assert_reads_back(&store, &old);
        assert_reads_back(&store, &new);
    }

    #[test]
    fn retention_deletes_the_payload_files_of_the_days_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let today = Store::now_day();
        let ms = |day: Day| day as i64 * DAY_MS + 3_600_000;
        let (old, recent) = (
            call_with_bodies(1, ms(today - 40), 1_000),
            call_with_bodies(2, ms(today), 1_000),
        );
        write(&store, vec![old.clone(), recent.clone()]);
        let date = |day: Day| date_of_day(day).format("%Y%m%d").to_string();
        // A file whose keyspace a crash already took, and one that is not a payload file.
        let stray = format!("{}-1.dat", date(today - 50));
        std::fs::write(dir.path().join("payloads").join(&stray), b"orphan").unwrap();
        std::fs::write(dir.path().join("payloads").join("notes.txt"), b"").unwrap();
        assert_eq!(payload_file_names(dir.path()).len(), 4);
        assert_eq!(store.drop_days_before(today - 30, today - 60).unwrap(), 1);
        let left = payload_file_names(dir.path());
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().any(|n| n.starts_with(&date(today))), "{left:?}");
        assert!(left.contains(&"notes.txt".to_string()));
        assert_eq!(read_back(&store, &old), (None, None));
        assert_reads_back(&store, &recent);
        // A call written to the dropped day after all gets a new file, read back as ever.
        let late = call_with_bodies(3, ms(today - 40), 1_000);
        write(&store, vec![late.clone()]);
        assert_reads_back(&store, &late);
    }

    #[test]
    fn a_payload_file_cut_short_reads_as_missing_and_its_earlier_bodies_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now().timestamp_millis();
        let calls: Vec<CallRecord> = (0..3).map(|n| call_with_bodies(n, now, 1_000)).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            write(&store, calls.clone());
        }
        // As a crash can leave it in buffered mode: the pointers made it, the end of the file
        // did not.
        let path = dir
            .path()
            .join("payloads")
            .join(&payload_file_names(dir.path())[0]);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(3_500).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_reads_back(&store, &calls[0]);
        assert_eq!(read_back(&store, &calls[1]), (calls[1].input.clone(), None));
        assert_eq!(read_back(&store, &calls[2]), (None, None));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read_back(&store, &calls[0]), (None, None));
    }

    #[test]
    fn strict_mode_payloads_are_there_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now().timestamp_millis();
        let calls: Vec<CallRecord> = (0..5).map(|n| call_with_bodies(n, now, 5_000)).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            let (writer, handle) =
                StoreWriter::start(store.clone(), Duration::from_millis(5), 64, true);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            for c in calls.clone() {
                rt.block_on(writer.record_durable(c)).unwrap();
            }
            // Acknowledged means synced: nothing is left for the shutdown to write.
            drop(writer);
            handle.join().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        for c in &calls {
            assert_reads_back(&store, c);
        }
    }

    /// Whether two records the query could return share a millisecond.
    fn brute_ties(written: &[AuditRecord], q: &AuditQuery) -> bool {
        let mut times: Vec<i64> = written
            .iter()
            .filter(|r| (q.from_ms..q.to_ms).contains(&r.time_ms))
            .map(|r| r.time_ms)
            .collect();
        let n = times.len();
        times.dedup();
        times.len() != n
    }
}
