//! The background writer: the only path by which the request path writes to the store. Calls
//! hand it their records through a bounded queue and go on; it writes them in batches (one
//! atomic write batch per flush interval) on its own thread, so a store stall never stalls a
//! proxied call. A full queue is reported to the caller (`Full`), who answers 503 rather than
//! dropping audit silently. Being the only writer of audit records, it also numbers them and
//! keeps the day's counter cells (`Tallies`) in memory, writing their new counts in the same
//! batch as the records they count. Captured bodies it appends to the day's payload files
//! (`payloads`), in a few large writes per batch, before committing the batch that points to
//! them.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use fjall::PersistMode;
use foldhash::HashMap;
use uuid::Uuid;

use super::*;

/// Everything one finished exchange leaves behind.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub audit: AuditRecord,
    /// The process this exchange belongs to, with `exchanges` counting this one.
    pub process: ProcessRecord,
    /// Whether the process must be findable later (its payloads read, a follow-up's owner
    /// checked). A call with nothing captured on a configuration without follow-up routes
    /// leaves only its audit record: two store writes fewer per call.
    pub findable: bool,
    pub stage: u8,
    pub input: Option<Payload>,
    pub output: Option<Payload>,
    /// Day (in the user's timezone) the points are counted on, when the call was charged.
    pub charged_day: Option<Day>,
    /// The call carried no token. No account or company can see it (`anonymous` is no one's
    /// name), so it is kept for the everything view only: no user or company index entries
    /// and counters, two store inserts fewer per call on routes without a token.
    pub anonymous: bool,
}

enum Op {
    Call(Box<CallRecord>),
    /// A call whose record must be on disk (fsynced) before its answer completes.
    Durable(Box<CallRecord>, tokio::sync::oneshot::Sender<()>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The queue is full: the disk is not keeping up.
#[derive(Debug)]
pub struct Full(pub Box<CallRecord>);

#[derive(Clone)]
pub struct StoreWriter {
    shared: Arc<Shared>,
}

struct Shared {
    tx: Sender<Op>,
    /// The writer thread. It sleeps until its flush interval is over and is woken early only
    /// for what cannot wait (a flush, a durable record, a batch's worth queued): waking it per
    /// record cost a wake-up and a few scheduler yields on every proxied call.
    thread: std::thread::Thread,
    /// Queued records that wake the writer early: a batch's worth, or half a small queue.
    wake_at: usize,
    /// Room kept free for calls already admitted, whose records come when they end.
    headroom: usize,
    /// The writer's last batch failed (`FAILING`, or `FAILING_FOR_GOOD` when fjall refuses
    /// every write until a restart): admission refuses calls, and health says so.
    failing: Arc<AtomicU8>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Disconnect first, then wake the writer, so it sees the end at once and not an
        // interval later.
        let (closed, _) = bounded(0);
        drop(std::mem::replace(&mut self.tx, closed));
        self.thread.unpark();
    }
}

const MAX_BATCH_OPS: usize = 4096;

/// How many queued records wake the writer before its interval is over: a batch's worth, or
/// half the queue when the queue is smaller. Woken, the writer takes what is queued into the
/// batch it builds (written at a batch's worth, at the interval, or when someone waits on
/// it), so a small queue empties long before admission would refuse calls for want of room;
/// records held in memory are then at most the queue plus one batch.
fn wake_at(capacity: usize) -> usize {
    MAX_BATCH_OPS.min(capacity / 2).max(1)
}

/// The writer's states, in `Shared::failing`.
const WRITING: u8 = 0;
const FAILING: u8 = 1;
/// fjall refuses every write once a journal write failed ("poisoned"), until a restart.
const FAILING_FOR_GOOD: u8 = 2;

/// The longest a strict call's answer waits for its record to be durable.
pub const DURABLE_WAIT: Duration = Duration::from_secs(10);

/// Room admission keeps free for calls already admitted: 64 records, or an eighth of a small
/// queue (a fixed 64 refused every call of a queue of 64 or fewer).
fn headroom(capacity: usize) -> usize {
    (capacity / 8).clamp(1, 64)
}

impl StoreWriter {
    /// Starts the writer thread; it stops when every `StoreWriter` clone is dropped, after
    /// writing what it holds.
    pub fn start(
        store: Arc<Store>,
        flush_interval: Duration,
        capacity: usize,
        strict: bool,
    ) -> (StoreWriter, std::thread::JoinHandle<()>) {
        let (tx, rx) = bounded(capacity);
        let failing = Arc::new(AtomicU8::new(WRITING));
        let writer_failing = failing.clone();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(store, rx, flush_interval, strict, &writer_failing))
            .expect("spawning the store writer thread");
        let shared = Shared {
            tx,
            thread: handle.thread().clone(),
            wake_at: wake_at(capacity),
            headroom: headroom(capacity),
            failing,
        };
        (
            StoreWriter {
                shared: Arc::new(shared),
            },
            handle,
        )
    }

    /// Hands a record to the writer without waiting.
    pub fn try_record(&self, record: CallRecord) -> std::result::Result<(), Full> {
        let tx = &self.shared.tx;
        match tx.try_send(Op::Call(Box::new(record))) {
            Ok(()) => {
                if tx.len() >= self.shared.wake_at {
                    self.shared.thread.unpark();
                }
                Ok(())
            }
            Err(TrySendError::Full(Op::Call(r))) | Err(TrySendError::Disconnected(Op::Call(r))) => {
                Err(Full(r))
            }
            Err(_) => unreachable!("only calls are sent here"),
        }
    }

    /// Hands a record over and waits until it is fsynced (`durability = "strict"`). Calls
    /// waiting at once share one batch and one fsync.
    /// Waits at most [`DURABLE_WAIT`]: a writer failing, or stuck behind a failing batch,
    /// answers no one.
    pub async fn record_durable(&self, record: CallRecord) -> Result<()> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let deadline = Instant::now() + DURABLE_WAIT;
        if self.failing() {
            // Not held for a batch that is failing; the record waits in the queue all the same
            // (for room too, within the wait).
            let code = record.audit.code;
            if let Err(e) = self
                .send_waking(Op::Call(Box::new(record)), Some(deadline))
                .await
            {
                tracing::error!(tracecode = %code, error = %e, "a call's record is lost: the store is failing and its queue is full");
            }
            return Err(StoreError::Failing);
        }
        self.send_waking(Op::Durable(Box::new(record), ack), Some(deadline))
            .await?;
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), done).await {
            Ok(done) => done.map_err(|_| self.gone_or_failing()),
            // Still queued: it is written when the writer gets to it, but not in time to hold
            // the answer for.
            Err(_) => Err(StoreError::Behind(DURABLE_WAIT)),
        }
    }

    /// Hands a record over, waiting for room (off the async workers).
    pub fn record_blocking(&self, record: Box<CallRecord>) -> Result<()> {
        self.send_blocking(Op::Call(record))
    }

    /// Whether a new call could be recorded now (admission refuses calls when it could not):
    /// the writer is not failing, and the queue has room.
    pub fn has_room(&self) -> bool {
        let tx = &self.shared.tx;
        !self.failing()
            && tx
                .capacity()
                .is_none_or(|cap| tx.len() + self.shared.headroom < cap)
    }

    /// Whether the writer's last batch failed.
    pub fn failing(&self) -> bool {
        self.shared.failing.load(Ordering::Relaxed) != WRITING
    }

    fn gone_or_failing(&self) -> StoreError {
        if self.failing() {
            StoreError::Failing
        } else {
            StoreError::WriterGone
        }
    }

    pub fn queued(&self) -> usize {
        self.shared.tx.len()
    }

    /// Waits until everything handed over before this call is written (read-your-writes for
    /// the account API).
    /// Waits at most `wait`: a writer whose batches fail (a full disk, say) keeps them and
    /// retries, and a reader is told so rather than held.
    pub async fn flush(&self, wait: Duration) -> Result<()> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let deadline = Instant::now() + wait;
        // A full queue (the writer failing, or far behind) is waited on within the same bound.
        self.send_waking(Op::Flush(ack), Some(deadline)).await?;
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), done).await {
            Ok(done) => done.map_err(|_| self.gone_or_failing()),
            Err(_) => Err(StoreError::Behind(wait)),
        }
    }

    /// Queues `op`, waiting for room until `deadline` at most.
    fn send_until(&self, op: Op, deadline: Instant) -> Result<()> {
        let started = Instant::now();
        let shared = &self.shared;
        shared.thread.unpark();
        let sent = shared
            .tx
            .send_timeout(op, deadline.saturating_duration_since(Instant::now()));
        shared.thread.unpark();
        match sent {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::SendTimeoutError::Timeout(_)) if self.failing() => {
                Err(StoreError::Failing)
            }
            Err(crossbeam_channel::SendTimeoutError::Timeout(_)) => {
                Err(StoreError::Behind(started.elapsed()))
            }
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                Err(StoreError::WriterGone)
            }
        }
    }

    /// As [`StoreWriter::flush`], from a thread outside any runtime (shutdown).
    /// A batch that fails is tried again until `wait` is over (a disk briefly full at
    /// shutdown loses nothing).
    pub fn flush_blocking(&self, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let (ack, mut done) = tokio::sync::oneshot::channel();
            self.send_until(Op::Flush(ack), deadline)?;
            let failed = loop {
                match done.try_recv() {
                    Ok(()) => return Ok(()),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                        break self.gone_or_failing()
                    }
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                        if Instant::now() >= deadline {
                            return Err(StoreError::Behind(wait));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            };
            let for_good = self.shared.failing.load(Ordering::Relaxed) == FAILING_FOR_GOOD;
            if !matches!(failed, StoreError::Failing) || for_good || Instant::now() >= deadline {
                return Err(failed);
            }
            // The writer tries again after its flush interval: ask again.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Queues an op someone waits on and wakes the writer for it; a full queue is waited out
    /// on the blocking pool, off the async workers, until `deadline` if there is one.
    async fn send_waking(&self, op: Op, deadline: Option<Instant>) -> Result<()> {
        match self.shared.tx.try_send(op) {
            Ok(()) => {
                self.shared.thread.unpark();
                Ok(())
            }
            Err(TrySendError::Full(op)) => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || match deadline {
                    Some(deadline) => this.send_until(op, deadline),
                    None => this.send_blocking(op),
                })
                .await
                .map_err(|_| StoreError::WriterGone)?
            }
            Err(TrySendError::Disconnected(_)) => Err(StoreError::WriterGone),
        }
    }

    fn send_blocking(&self, op: Op) -> Result<()> {
        let shared = &self.shared;
        let result = match shared.tx.try_send(op) {
            Err(TrySendError::Full(op)) => {
                // The writer is behind: make sure it is awake while we wait for room.
                shared.thread.unpark();
                shared.tx.send(op).map_err(|_| StoreError::WriterGone)
            }
            Err(TrySendError::Disconnected(_)) => Err(StoreError::WriterGone),
            Ok(()) => Ok(()),
        };
        shared.thread.unpark();
        result
    }
}

fn run(
    store: Arc<Store>,
    rx: Receiver<Op>,
    flush_interval: Duration,
    strict: bool,
    failing: &AtomicU8,
) {
    let mut calls: Vec<Box<CallRecord>> = Vec::new();
    let mut acks = Vec::new();
    // A record is to be written within flush_interval of its call's answer. The writer looks
    // every quarter interval, and begins a batch early enough to end in time, judged by how
    // long recent batches took to write (a batch of large captures takes a while).
    let look = (flush_interval / 4).max(Duration::from_millis(1));
    let mut batch_time = Duration::ZERO;
    let mut due = Due::default();
    loop {
        // Take what is queued, up to a batch; a flush thereby covers everything sent before it.
        let mut disconnected = false;
        while calls.len() < MAX_BATCH_OPS {
            match rx.try_recv() {
                Ok(Op::Call(c)) => {
                    due.hold(&c);
                    calls.push(c);
                }
                // A flush whose reader gave up (it answered 503) needs no batch.
                Ok(Op::Flush(ack)) if ack.is_closed() => {}
                Ok(Op::Flush(ack)) => acks.push(ack),
                Ok(Op::Durable(c, ack)) => {
                    due.hold(&c);
                    calls.push(c);
                    acks.push(ack);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        let full = calls.len() >= MAX_BATCH_OPS;
        let mut wrote = false;
        // A record answered just after a batch began waits for that batch, then for its own:
        // the oldest is due with room for both (or a look, when batches are quicker).
        if full
            || disconnected
            || !acks.is_empty()
            || due.is_due(flush_interval.saturating_sub(batch_time + batch_time.max(look)))
        {
            if !calls.is_empty() {
                let began = Instant::now();
                let mut committed = false;
                let result = write_batch(&store, &calls, strict, &mut committed);
                // Recent batches' write time: up at once when writing slows, down slowly.
                let took = began.elapsed();
                batch_time = ((batch_time * 3 + took) / 4).max(took);
                if let Err(e) = result {
                    tracing::error!(error = %e, records = calls.len(), committed, "store batch failed; retrying next interval");
                    let poisoned = matches!(e, StoreError::Engine(fjall::Error::Poisoned));
                    failing.store(
                        if poisoned { FAILING_FOR_GOOD } else { FAILING },
                        Ordering::Relaxed,
                    );
                    // Whoever waits on the batch (a strict call, an account read) is told now,
                    // by its answer dropped; the records stay for the next try, unless they
                    // were committed and only their persisting failed: tried again, they
                    // would be on record twice.
                    acks.clear();
                    if disconnected {
                        // Shutting down: nothing is left to keep the records for.
                        if committed {
                            tracing::error!(
                                records = calls.len(),
                                "records written but not made durable at shutdown: the store could not persist them"
                            );
                        } else {
                            tracing::error!(
                                records = calls.len(),
                                "records not stored at shutdown: the store could not be written"
                            );
                        }
                        return;
                    }
                    if committed {
                        calls.clear();
                        due = Due::default();
                    }
                    std::thread::sleep(flush_interval);
                    continue;
                }
                calls.clear();
                due = Due::default();
                wrote = true;
                if failing.swap(WRITING, Ordering::Relaxed) != WRITING {
                    tracing::info!("store batches succeed again");
                }
            }
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
            if disconnected {
                let _ = store.sync();
                return;
            }
            if full || wrote {
                // More is queued behind the batch just written (perhaps a flush), or came in
                // while it was written: look again before sleeping.
                continue;
            }
        }
        std::thread::park_timeout(look);
    }
}

/// When the records a writer holds are due: by the answer time of the oldest, or, should the
/// wall clock have been set back, by when the writer took it.
#[derive(Default)]
pub(super) struct Due {
    answered_ms: Option<i64>,
    taken: Option<Instant>,
}

impl Due {
    pub(super) fn hold(&mut self, call: &CallRecord) {
        let a = &call.audit;
        let answered = a.time_ms + (a.duration_us / 1000) as i64;
        self.answered_ms = Some(self.answered_ms.map_or(answered, |t| t.min(answered)));
        self.taken.get_or_insert_with(Instant::now);
    }

    /// Whether the oldest record held is `wait` old or older.
    pub(super) fn is_due(&self, wait: Duration) -> bool {
        let Some(taken) = self.taken else {
            return false;
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let answered_age = self
            .answered_ms
            .map_or(0, |t| u64::try_from(now_ms - t).unwrap_or(0));
        Duration::from_millis(answered_age) >= wait || taken.elapsed() >= wait
    }
}

/// How many days' counters the writer keeps in memory: today, and the days before it that
/// late calls (long ones finishing after midnight) still write to.
const TALLY_DAYS: usize = 3;

/// The writer's running state of the audit days it writes: each day's counter cells, record
/// numbers and operation numbers, read from the day keyspace when the day is first written
/// after a start, so a batch writes absolute counts without reading them back.
#[derive(Default)]
pub(super) struct Tallies {
    days: BTreeMap<Day, DayTally>,
}

struct DayTally {
    keyspace: Keyspace,
    /// The number the day's next record gets: how many it holds.
    next_seq: u32,
    operations: HashMap<String, u32>,
    cells: HashMap<Vec<u8>, Cell>,
    /// Cells changed by the batch being built.
    dirty: Vec<Vec<u8>>,
}

#[derive(Clone, Copy, Default)]
struct Cell {
    count: u64,
    dirty: bool,
}

impl Tallies {
    /// Forgets a day retention dropped, so a late write starts it afresh.
    pub(super) fn forget(&mut self, day: Day) {
        self.days.remove(&day);
    }

    fn day(&mut self, store: &Store, day: Day) -> Result<&mut DayTally> {
        Ok(match self.days.entry(day) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => {
                new.insert(DayTally::load(store.day_keyspace("audit", day)?, day)?)
            }
        })
    }

    /// Keeps the newest days only; called between batches, when no cell is dirty.
    fn trim(&mut self) {
        while self.days.len() > TALLY_DAYS {
            self.days.pop_first();
        }
    }
}

impl DayTally {
    /// The day's counts as stored; when a cell cannot be read (a damaged store), counted again
    /// from the day's records, which are what the counts count. Refusing the day instead would
    /// stop every later batch, and audit with it.
    fn load(keyspace: Keyspace, day: Day) -> Result<DayTally> {
        match Self::read_counts(keyspace.clone()) {
            Err(StoreError::Corrupt { key, reason }) => {
                tracing::error!(
                    day = %date_of_day(day),
                    key,
                    reason,
                    "an audit counter cannot be read; counting the day's records again"
                );
                Self::recount(keyspace, day)
            }
            read => read,
        }
    }

    fn read_operations(keyspace: &Keyspace) -> Result<HashMap<String, u32>> {
        let mut operations = HashMap::default();
        for guard in keyspace.prefix([OPERATION]) {
            let (k, v) = guard.into_inner()?;
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            operations.insert(name, operation_id_from(&v));
        }
        Ok(operations)
    }

    /// Counts the day again from the very entries readers walk: everything from each record's
    /// header (readable even when the rest of the record is not), users and companies from
    /// their index entries; the next record number follows the highest in use.
    fn recount(keyspace: Keyspace, day: Day) -> Result<DayTally> {
        let mut operations = Self::read_operations(&keyspace)?;
        let mut tally = DayTally {
            keyspace: keyspace.clone(),
            next_seq: 0,
            operations: HashMap::default(),
            cells: HashMap::default(),
            dirty: Vec::new(),
        };
        // Every stored cell is written again: the damaged one with its true count (0 if no
        // entry counts in it).
        for guard in keyspace.prefix([COUNTER]) {
            let k = guard.key()?;
            tally.cells.insert(
                k.to_vec(),
                Cell {
                    count: 0,
                    dirty: true,
                },
            );
            tally.dirty.push(k.to_vec());
        }
        let mut next_seq = 0u64;
        let mut cell = Vec::with_capacity(64);
        for guard in keyspace.prefix([RECORD]) {
            let (k, v) = guard.into_inner()?;
            let Some((ms_of_day, seq)) = entry_position(&k) else {
                continue;
            };
            next_seq = next_seq.max(u64::from(seq) + 1);
            let Some((header, _)) = binary_audit_header(&v) else {
                continue;
            };
            // An operation the day's map lost is named again from its records, so a new one
            // never takes its number.
            if let Ok(a) = decode_audit(day, &k, &v) {
                operations.entry(a.operation).or_insert(header.operation);
            }
            tally.count_scope(&mut cell, SCOPE_ALL, "", hour_of(ms_of_day), header);
        }
        for (index, scope) in [(USER_INDEX, SCOPE_USER), (COMPANY_INDEX, SCOPE_COMPANY)] {
            for guard in keyspace.prefix([index]) {
                let (k, v) = guard.into_inner()?;
                let (Some((ms_of_day, _)), Some(header)) =
                    (entry_position(&k), Header::read(&mut &v[..]))
                else {
                    continue;
                };
                // `tag owner 0x00 ms_of_day seq`
                let Some(owner) = k
                    .get(1..k.len().saturating_sub(9))
                    .and_then(|o| std::str::from_utf8(o).ok())
                else {
                    continue;
                };
                tally.count_scope(&mut cell, scope, owner, hour_of(ms_of_day), header);
            }
        }
        tally.operations = operations;
        tally.next_seq = u32::try_from(next_seq).map_err(|_| corrupt(b"R", "too many records"))?;
        Ok(tally)
    }

    /// Counts one record in the cells of everyone who sees it: all, and (unless made without
    /// a token) its user and its company.
    fn count_record(
        &mut self,
        cell: &mut Vec<u8>,
        a: &AuditRecord,
        hour: u8,
        header: Header,
        anonymous: bool,
    ) {
        let scopes = [
            (SCOPE_ALL, ""),
            (SCOPE_USER, a.username.as_str()),
            (SCOPE_COMPANY, a.company_key.as_str()),
        ];
        let seen_by = if anonymous { 1 } else { scopes.len() };
        for (scope, owner) in scopes.into_iter().take(seen_by) {
            self.count_scope(cell, scope, owner, hour, header);
        }
    }

    /// Counts one entry in its owner's cells: by hour, and by day where the scope has day cells.
    fn count_scope(
        &mut self,
        cell: &mut Vec<u8>,
        scope: u8,
        owner: &str,
        hour: u8,
        header: Header,
    ) {
        counter_key(cell, scope, owner, hour, header);
        self.count(cell);
        if has_day_cells(scope) {
            counter_key(cell, scope, owner, WHOLE_DAY, header);
            self.count(cell);
        }
    }

    fn read_counts(keyspace: Keyspace) -> Result<DayTally> {
        let mut cells = HashMap::default();
        let mut next_seq = 0u64;
        let everything = counter_prefix(SCOPE_ALL, "");
        for guard in keyspace.prefix([COUNTER]) {
            let (k, v) = guard.into_inner()?;
            let count = take_varint(&mut &v[..]).ok_or_else(|| corrupt(&k, "not a count"))?;
            // Every record counts once in the whole-day cells of scope `a`.
            if k.starts_with(&everything)
                && counter_cell(&k).is_some_and(|(hour, _)| hour == WHOLE_DAY)
            {
                next_seq += count;
            }
            cells.insert(
                k.to_vec(),
                Cell {
                    count,
                    dirty: false,
                },
            );
        }
        let operations = Self::read_operations(&keyspace)?;
        Ok(DayTally {
            keyspace,
            next_seq: u32::try_from(next_seq).map_err(|_| corrupt(b"N", "too many records"))?,
            operations,
            cells,
            dirty: Vec::new(),
        })
    }

    fn operation(&mut self, batch: &mut fjall::OwnedWriteBatch, operation: &str) -> u32 {
        if let Some(id) = self.operations.get(operation) {
            return *id;
        }
        let id = self.operations.len() as u32;
        batch.insert(
            &self.keyspace,
            operation_key(operation),
            id.to_be_bytes().as_slice(),
        );
        self.operations.insert(operation.to_string(), id);
        id
    }

    fn count(&mut self, key: &[u8]) {
        match self.cells.get_mut(key) {
            Some(cell) => {
                cell.count += 1;
                if !cell.dirty {
                    cell.dirty = true;
                    self.dirty.push(key.to_vec());
                }
            }
            None => {
                self.cells.insert(
                    key.to_vec(),
                    Cell {
                        count: 1,
                        dirty: true,
                    },
                );
                self.dirty.push(key.to_vec());
            }
        }
    }

    /// Puts the changed cells' counts into the batch.
    fn write_cells(&mut self, batch: &mut fjall::OwnedWriteBatch) {
        let mut value = Vec::with_capacity(10);
        for key in self.dirty.drain(..) {
            if let Some(cell) = self.cells.get_mut(&key) {
                cell.dirty = false;
                value.clear();
                put_varint(&mut value, cell.count);
                batch.insert(&self.keyspace, key, value.as_slice());
            }
        }
    }
}

/// The hour cell a time within the day counts in.
fn hour_of(ms_of_day: u32) -> u8 {
    (ms_of_day / HOUR_MS).min(u32::from(WHOLE_DAY) - 1) as u8
}

/// Writes a batch; `committed` says, on failure, whether it was committed (in the store,
/// though perhaps not persisted) before it failed.
fn write_batch(
    store: &Store,
    calls: &[Box<CallRecord>],
    strict: bool,
    committed: &mut bool,
) -> Result<()> {
    // Held for the whole batch: the counts it writes are absolute, so two batches must not
    // interleave.
    let mut tallies = store.tallies.lock();
    let mut files = store.payload_files.lock();
    tallies.trim();
    files.begin_batch();
    let written = write_batch_with(store, &mut tallies, &mut files, calls, strict, committed);
    if written.is_err() {
        if !*committed {
            // The counts and record numbers in memory ran ahead of the store: read them again.
            *tallies = Tallies::default();
        }
        // Cuts off the bytes no commit names (those of a committed batch stay).
        files.abandon();
    }
    written
}

/// A captured exchange of a batch: its process, its place in the batch, and the pointers to
/// its input and output bodies in the payload files.
struct ProcessExchange {
    code: Uuid,
    call: usize,
    pointers: [Option<Vec<u8>>; 2],
}

/// Writes the record of one process with what `exchanges` (all of this process, in batch
/// order) add to it. Exchanges may finish out of order: the record keeps the highest exchange
/// count, so a process reloaded after a restart never numbers (and stages) an exchange twice,
/// and each stage keeps the pointers of the latest exchange that reached it.
fn write_process(
    store: &Store,
    batch: &mut fjall::OwnedWriteBatch,
    payload_days: &mut Vec<(Day, Keyspace)>,
    calls: &[Box<CallRecord>],
    exchanges: &mut [ProcessExchange],
) -> Result<()> {
    let code = exchanges[0].code;
    let day = calls[exchanges[0].call].process.day;
    let payloads = match payload_days.iter().find(|(d, _)| *d == day) {
        Some((_, ks)) => ks.clone(),
        None => {
            let ks = store.day_keyspace("payload", day)?;
            payload_days.push((day, ks.clone()));
            ks
        }
    };
    let mut record: Option<ProcessRecord> = None;
    let mut stages = Stages::default();
    if exchanges
        .iter()
        .any(|e| calls[e.call].process.exchanges > 1)
    {
        if let Some(v) = payloads.get(process_key(&code))? {
            if let Ok(stored) = decode_process(code.as_bytes(), &v) {
                stages = decode_stages(&v);
                record = Some(stored);
            }
        }
    }
    for exchange in exchanges.iter_mut() {
        let call = &calls[exchange.call];
        let number = call.process.exchanges;
        if record.as_ref().is_none_or(|r| r.exchanges < number) {
            record = Some(call.process.clone());
        }
        let slot = &mut stages[usize::from(call.stage.min(crate::trace::MAX_STAGE))];
        if slot.as_ref().is_none_or(|s| s.exchange <= number) {
            let [input, output] = std::mem::take(&mut exchange.pointers);
            *slot = Some(StagePointers {
                exchange: number,
                input,
                output,
            });
        }
    }
    if let Some(record) = record {
        batch.insert(
            &payloads,
            process_key(&code),
            encode_process(&record, &stages),
        );
    }
    Ok(())
}

fn write_batch_with(
    store: &Store,
    tallies: &mut Tallies,
    files: &mut payloads::PayloadFiles,
    calls: &[Box<CallRecord>],
    strict: bool,
    committed: &mut bool,
) -> Result<()> {
    let mut batch = store.db.batch();
    let mut stats: HashMap<Vec<u8>, DayCounts> = HashMap::default();
    let mut exchanges: Vec<ProcessExchange> = Vec::new();
    let mut touched: Vec<Day> = Vec::new();
    let mut cell = Vec::with_capacity(64);
    let mut header_bytes = Vec::with_capacity(8);
    for (index, call) in calls.iter().enumerate() {
        let a = &call.audit;
        let day = day_of_ms(a.time_ms);
        let ms_of_day = (a.time_ms - day as i64 * DAY_MS) as u32;
        let hour = hour_of(ms_of_day);
        let tally = tallies.day(store, day)?;
        if !touched.contains(&day) {
            touched.push(day);
        }
        let seq = tally.next_seq;
        tally.next_seq += 1;
        let header = Header {
            service: a.service.code(),
            group: a.method_group.code(),
            operation: tally.operation(&mut batch, &a.operation),
        };
        header_bytes.clear();
        header.write(&mut header_bytes);
        let audit = &tally.keyspace;
        batch.insert(
            audit,
            entry_key(RECORD, None, ms_of_day, seq),
            encode_audit(a, header),
        );
        if !call.anonymous {
            batch.insert(
                audit,
                entry_key(USER_INDEX, Some(&a.username), ms_of_day, seq),
                header_bytes.as_slice(),
            );
            batch.insert(
                audit,
                entry_key(COMPANY_INDEX, Some(&a.company_key), ms_of_day, seq),
                header_bytes.as_slice(),
            );
        }
        tally.count_record(&mut cell, a, hour, header, call.anonymous);

        if call.findable {
            let mut pointers = [None, None];
            for (pointer, payload) in pointers.iter_mut().zip([&call.input, &call.output]) {
                if let Some(p) = payload {
                    *pointer = Some(files.stage(call.process.day, p)?);
                }
            }
            exchanges.push(ProcessExchange {
                code: a.code,
                call: index,
                pointers,
            });
        }
        if let Some(day) = call.charged_day {
            let entry = stats
                .entry(stats_key(&a.username, day, a.service, a.method_group))
                .or_default();
            entry.points += a.points;
            entry.unique_points += a.unique_points;
        }
    }
    for day in touched {
        tallies.day(store, day)?.write_cells(&mut batch);
    }
    // One write per process of the batch: its record with the stages this batch gave it.
    exchanges.sort_unstable_by_key(|e| (e.code, e.call));
    let mut payload_days: Vec<(Day, Keyspace)> = Vec::new();
    for process in exchanges.chunk_by_mut(|a, b| a.code == b.code) {
        write_process(store, &mut batch, &mut payload_days, calls, process)?;
    }
    for (key, add) in stats {
        let current = store
            .stats
            .get(&key)?
            .map(|v| counts_from(&v))
            .unwrap_or_default();
        let total = DayCounts {
            points: current.points + add.points,
            unique_points: current.unique_points + add.unique_points,
        };
        batch.insert(&store.stats, key, counts_value(total).as_slice());
    }
    // The bodies first: a committed pointer never names bytes not yet written (nor, in strict
    // mode, not yet synced). A crash between the two leaves bytes no pointer names, which
    // cost disk only until retention deletes their day.
    files.append(strict)?;
    batch.commit()?;
    *committed = true;
    files.committed();
    store.db.persist(if strict {
        PersistMode::SyncAll
    } else {
        PersistMode::Buffer
    })?;
    Ok(())
}
