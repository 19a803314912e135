//! Captured payload bytes, kept out of the key-value store, where the journal, the memtable and
//! the blob file each copied every body (the first two on the writer's thread, which shares the
//! proxy's cores). The bodies go to append-only files under `<store>/payloads/`, and the day's
//! payload keyspace keeps a small pointer to them (file number, offset, length, content type,
//! truncated flag), committed only after the bytes are written.
//!
//! Files are named `YYYYMMDD-N.dat`: the UTC day of the payload keyspace whose pointers name
//! them, and a number taken when the file is made, above every number on disk and at least the
//! milliseconds since the epoch then, so not even the number of a deleted file comes back. A
//! file is appended to only by the store instance that made it: a reopened store starts new
//! files, so whatever a crash left at a file's end, bytes a committed pointer names are never
//! written over.
//!
//! This module owns the file names, the writer's open files (`PayloadFiles`), the pointer
//! format, reading bytes back, and deleting files of days retention drops.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;

use super::{
    date_of_day, day_of_date, put_str, put_varint, take, take_str, take_varint, Day, Payload,
    Result, StoreError,
};

/// The first byte of a pointer value. Values written inline by older stores start with their
/// truncated flag, 0 or 1.
pub(super) const POINTER_V1: u8 = 2;

/// How many days' files the writer keeps open: today and the days before it that follow-ups
/// of older processes still write to. A day closed and written again gets a new file.
const OPEN_DAYS: usize = 3;

/// The batch's bodies are appended in writes of up to this. On this project's test machine a
/// batch's 20 MB in one write cost the kernel three to four times the system time of 1 MiB
/// writes (2x at 4 MiB).
const WRITE_BYTES: usize = 1 << 20;

/// The most pieces one `writev` takes (Linux's IOV_MAX).
const MAX_SLICES: usize = 1024;

/// How far the written bytes of a file may run ahead of the disk before the writer hands them
/// to it (see `DayFile::write_behind`).
const WRITE_BEHIND_BYTES: u64 = 8 << 20;

fn io(e: std::io::Error) -> StoreError {
    StoreError::Engine(fjall::Error::from(e))
}

/// Where a payload's bytes are: which file of the keyspace's day, and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pointer {
    pub file: u64,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub truncated: bool,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
}

impl Pointer {
    /// `POINTER_V1`, truncated flag, then varints file, offset, length, then the content type,
    /// then, for a coded body only, its content encoding (pointers written before there was
    /// one end after the content type, and read as bodies without one).
    pub fn encode(&self) -> Vec<u8> {
        let ct = self.content_type.as_deref().unwrap_or("");
        let ce = self.content_encoding.as_deref();
        let mut v = Vec::with_capacity(2 + 3 * 10 + 2 + ct.len() + ce.map_or(0, str::len));
        v.push(POINTER_V1);
        v.push(self.truncated as u8);
        put_varint(&mut v, self.file);
        put_varint(&mut v, self.offset_bytes);
        put_varint(&mut v, self.len_bytes);
        put_str(&mut v, ct);
        if let Some(ce) = ce {
            put_str(&mut v, ce);
        }
        v
    }

    pub fn decode(value: &[u8]) -> Option<Pointer> {
        let mut v = value;
        if *take(&mut v, 1)?.first()? != POINTER_V1 {
            return None;
        }
        let truncated = *take(&mut v, 1)?.first()? != 0;
        let file = take_varint(&mut v)?;
        let offset_bytes = take_varint(&mut v)?;
        let len_bytes = take_varint(&mut v)?;
        let ct = take_str(&mut v)?;
        let ce = if v.is_empty() {
            None
        } else {
            Some(take_str(&mut v)?)
        };
        Some(Pointer {
            file,
            offset_bytes,
            len_bytes,
            truncated,
            content_type: (!ct.is_empty()).then_some(ct),
            content_encoding: ce,
        })
    }
}

fn file_name(day: Day, file: u64) -> String {
    format!("{}-{file}.dat", date_of_day(day).format("%Y%m%d"))
}

/// The day and number of a payload file's name; `None` for anything else in the folder.
fn parse_file_name(name: &str) -> Option<(Day, u64)> {
    let (date, number) = name.strip_suffix(".dat")?.split_once('-')?;
    let date = NaiveDate::parse_from_str(date, "%Y%m%d").ok()?;
    Some((day_of_date(date), number.parse().ok()?))
}

/// The payload files in `dir`: day, number, bytes, path.
fn list(dir: &Path) -> Result<Vec<(Day, u64, u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Removed by hand: no files, and the next one made recreates the folder.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some((day, number)) = name.to_str().and_then(parse_file_name) else {
            continue;
        };
        // A file deleted meanwhile (retention) just counts as nothing.
        let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
        out.push((day, number, bytes, entry.path()));
    }
    Ok(out)
}

/// The bytes a pointer names, or `None` when they are not all there: file gone (retention),
/// or shorter than the pointer says (a crash lost what the pointer's batch appended).
pub(super) fn read(dir: &Path, day: Day, p: &Pointer) -> Result<Option<bytes::Bytes>> {
    let file = match File::open(dir.join(file_name(day, p.file))) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let file_bytes = file.metadata().map_err(io)?.len();
    // Checked before allocating, so a garbled length never asks for a huge buffer.
    let Some(end) = p.offset_bytes.checked_add(p.len_bytes) else {
        return Ok(None);
    };
    if end > file_bytes {
        return Ok(None);
    }
    let Ok(len) = usize::try_from(p.len_bytes) else {
        return Ok(None);
    };
    let mut body = vec![0u8; len];
    match file.read_exact_at(&mut body, p.offset_bytes) {
        Ok(()) => Ok(Some(body.into())),
        // Truncated between the length check and the read.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io(e)),
    }
}

/// Writes every byte of `slices` (emptied on the way), a few system calls for many bodies.
fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes of all payload files, for `Store::disk_bytes`.
pub(super) fn disk_bytes(dir: &Path) -> u64 {
    list(dir)
        .map(|files| files.iter().map(|f| f.2).sum())
        .unwrap_or(0)
}

/// The writer's side: the files it appends to, one per day written since the store opened,
/// and the bytes of the batch being built. Behind the store's lock, held by the writer for a
/// whole batch and by retention while it deletes files.
pub(super) struct PayloadFiles {
    dir: PathBuf,
    /// No file made from now on gets a number below this: one above every number on disk when
    /// the store opened, then one above the last file made.
    next_number: u64,
    open: BTreeMap<Day, DayFile>,
}

struct DayFile {
    number: u64,
    file: File,
    /// The file's length: all of it written by this store instance, through `file`.
    len_bytes: u64,
    /// Its length when the batch being built began: a batch given up is cut back to it.
    batch_start_bytes: u64,
    /// Bodies staged and not yet written, in the order of their pointers' offsets (less than
    /// `WRITE_BYTES` of them, unless one body alone is more): the captured bytes themselves,
    /// shared, written straight from where the proxy put them.
    pending: Vec<bytes::Bytes>,
    pending_bytes: usize,
    /// Written since the last `sync_data`.
    unsynced: bool,
    /// Where the bytes handed to the disk (`write_behind`) end, and where those before them,
    /// already waited for and dropped from the page cache, end.
    submitted_bytes: u64,
    dropped_bytes: u64,
}

impl DayFile {
    fn write_pending(&mut self) -> std::io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(self.pending.len().min(MAX_SLICES));
        let mut queued = 0;
        for piece in self
            .pending
            .iter()
            .flat_map(|body| body.chunks(WRITE_BYTES))
        {
            slices.push(IoSlice::new(piece));
            queued += piece.len();
            if queued >= WRITE_BYTES || slices.len() == MAX_SLICES {
                write_all_vectored(&mut self.file, &mut slices)?;
                slices.clear();
                queued = 0;
            }
        }
        write_all_vectored(&mut self.file, &mut slices)?;
        drop(slices);
        self.unsynced = true;
        self.len_bytes += self.pending_bytes as u64;
        self.pending.clear();
        self.pending_bytes = 0;
        if self.len_bytes - self.submitted_bytes >= WRITE_BEHIND_BYTES {
            self.write_behind();
        }
        Ok(())
    }

    /// Captured bodies stream to disk at the rate calls arrive (~100 MB/s for 10 KB bodies at
    /// 10k calls/s) and are rarely read back. Left to the kernel, they pile up as gigabytes of
    /// dirty page cache, and on the development VM copying into ever new page-cache pages grew
    /// to 2/3 of the writer's time. So the writer starts writing back each 8 MiB it writes, and
    /// drops the 8 MiB before it from the cache once it is on disk (usually long since): the
    /// files keep a few pages of cache each. This is a hint to the kernel, not durability
    /// (strict mode still syncs), and a failure of it changes nothing stored.
    #[cfg(target_os = "linux")]
    fn write_behind(&mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let (dropped, submitted, end) = (self.dropped_bytes, self.submitted_bytes, self.len_bytes);
        // SAFETY: plain system calls on an open descriptor this struct owns; the ranges lie
        // within the bytes written to it.
        unsafe {
            if submitted > dropped {
                libc::sync_file_range(
                    fd,
                    dropped as libc::off64_t,
                    (submitted - dropped) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(
                    fd,
                    dropped as libc::off_t,
                    (submitted - dropped) as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
            libc::sync_file_range(
                fd,
                submitted as libc::off64_t,
                (end - submitted) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.dropped_bytes = submitted;
        self.submitted_bytes = end;
    }

    #[cfg(not(target_os = "linux"))]
    fn write_behind(&mut self) {}
}

impl PayloadFiles {
    /// Creates the folder if need be and finds the numbers already taken.
    pub fn open(dir: PathBuf) -> Result<PayloadFiles> {
        std::fs::create_dir_all(&dir).map_err(io)?;
        let highest = list(&dir)?.iter().map(|f| f.1).max().unwrap_or(0);
        Ok(PayloadFiles {
            dir,
            next_number: highest + 1,
            open: BTreeMap::new(),
        })
    }

    /// Adds a body to the batch's bytes for `day` and returns the pointer value naming where
    /// it goes. The bytes reach the file by `append` at the latest, before any pointer is
    /// committed; staged bytes already written are cut off again if the batch is given up.
    pub fn stage(&mut self, day: Day, p: &Payload) -> Result<Vec<u8>> {
        let day_file = self.day_file(day)?;
        let pointer = Pointer {
            file: day_file.number,
            offset_bytes: day_file.len_bytes + day_file.pending_bytes as u64,
            len_bytes: p.body.len() as u64,
            truncated: p.truncated,
            content_type: p.content_type.clone(),
            content_encoding: p.content_encoding.clone(),
        };
        day_file.pending.push(p.body.clone());
        day_file.pending_bytes += p.body.len();
        if day_file.pending_bytes >= WRITE_BYTES {
            // On failure the batch is given up (`abandon`), which cuts the file back.
            day_file.write_pending().map_err(io)?;
        }
        Ok(pointer.encode())
    }

    /// Writes what the batch has left staged and, with `strict`, syncs every file the batch
    /// wrote to, so that the pointers committed next name bytes already there.
    pub fn append(&mut self, strict: bool) -> Result<()> {
        let mut failed = None;
        for (day, f) in self.open.iter_mut() {
            let mut written = if f.pending.is_empty() {
                Ok(())
            } else {
                f.write_pending()
            };
            if strict && f.unsynced {
                written = written.and_then(|()| f.file.sync_data());
                f.unsynced = false;
            }
            if let Err(e) = written {
                failed = Some((*day, e));
                break;
            }
        }
        match failed {
            Some((_, e)) => {
                self.abandon();
                Err(io(e))
            }
            // Kept until the batch's pointers are committed: a commit that fails gives the
            // batch up, and `abandon` cuts these bytes off again.
            None => Ok(()),
        }
    }

    /// Drops the staged bytes of a batch that will not be committed.
    pub fn abandon(&mut self) {
        let mut uncut = Vec::new();
        for (day, f) in self.open.iter_mut() {
            f.pending.clear();
            f.pending_bytes = 0;
            // The batch's bytes, written or partly written, are named by nothing: cut them
            // off, so a batch tried again (a full disk, say) does not add them twice. A file
            // that cannot be cut is given up, and the day's next bytes go to a new one.
            match f.file.set_len(f.batch_start_bytes) {
                Ok(()) => {
                    f.len_bytes = f.batch_start_bytes;
                    f.submitted_bytes = f.submitted_bytes.min(f.len_bytes);
                    f.dropped_bytes = f.dropped_bytes.min(f.len_bytes);
                }
                Err(_) => uncut.push(*day),
            }
        }
        for day in uncut {
            self.forget(day);
        }
    }

    /// The batch's pointers are committed: its bytes are named now, and no later failure of
    /// the batch (its persisting, say) may cut them off.
    pub fn committed(&mut self) {
        for f in self.open.values_mut() {
            f.batch_start_bytes = f.len_bytes;
        }
    }

    /// Syncs every file written since its last sync (shutdown, `Store::sync`).
    pub fn sync(&mut self) -> Result<()> {
        for f in self.open.values_mut() {
            if f.unsynced {
                f.file.sync_data().map_err(io)?;
                f.unsynced = false;
            }
        }
        Ok(())
    }

    /// Begins a batch: keeps the newest days' files open only, and marks where each ends, for
    /// `abandon`. Called between batches, when nothing is staged.
    pub fn begin_batch(&mut self) {
        while self.open.len() > OPEN_DAYS {
            self.open.pop_first();
        }
        for f in self.open.values_mut() {
            f.batch_start_bytes = f.len_bytes;
        }
    }

    /// Closes and deletes the files of days before `before`, those of days no keyspace names
    /// any more included (a crash between dropping a keyspace and deleting its files).
    pub fn delete_days_before(&mut self, before: Day) -> Result<()> {
        self.open.retain(|day, _| *day >= before);
        for (day, _, _, path) in list(&self.dir)? {
            if day >= before {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(())
    }

    /// Stops appending to a day's file after a failed write: how much of the write reached it
    /// is unknown, so the day's next bytes go to a new file rather than guess its length.
    fn forget(&mut self, day: Day) {
        self.open.remove(&day);
    }

    fn day_file(&mut self, day: Day) -> Result<&mut DayFile> {
        if !self.open.contains_key(&day) {
            let day_file = self.create(day)?;
            self.open.insert(day, day_file);
        }
        self.open
            .get_mut(&day)
            .ok_or_else(|| super::corrupt(b"payloads", "a day file vanished"))
    }

    /// Makes a new, empty file for `day` with a number never used before.
    fn create(&mut self, day: Day) -> Result<DayFile> {
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let mut number = self.next_number.max(now_ms);
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let file = loop {
            // `create_new`: a name already there (another tool's, or a clock step back onto an
            // older number) is never opened, let alone appended to.
            match OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(self.dir.join(file_name(day, number)))
            {
                Ok(file) => break file,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => number += 1,
                Err(e) => return Err(io(e)),
            }
        };
        self.next_number = number + 1;
        // The new name must survive a power loss as surely as the bytes synced into it.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(DayFile {
            number,
            file,
            len_bytes: 0,
            batch_start_bytes: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            unsynced: false,
            submitted_bytes: 0,
            dropped_bytes: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(body: &'static [u8]) -> Payload {
        Payload {
            content_encoding: None,
            content_type: Some("application/json".into()),
            truncated: false,
            body: bytes::Bytes::from_static(body),
        }
    }

    #[test]
    fn pointers_round_trip_and_reject_other_values() {
        let p = Pointer {
            file: 1_700_000_000_123,
            offset_bytes: u64::MAX - 1,
            len_bytes: 20_000,
            truncated: true,
            content_type: Some("text/plain".into()),
            content_encoding: None,
        };
        assert_eq!(Pointer::decode(&p.encode()), Some(p.clone()));
        let coded = Pointer {
            content_encoding: Some("gzip".into()),
            ..p.clone()
        };
        assert_eq!(Pointer::decode(&coded.encode()), Some(coded.clone()));
        // A body without a coding keeps the pointer as it was before codings were stored.
        assert_eq!(coded.encode()[..p.encode().len()], p.encode());
        let v = coded.encode();
        assert_eq!(Pointer::decode(&v[..v.len() - 1]), None);
        let bare = Pointer {
            content_type: None,
            truncated: false,
            ..p
        };
        assert_eq!(Pointer::decode(&bare.encode()), Some(bare.clone()));
        let v = bare.encode();
        assert_eq!(Pointer::decode(&v[..v.len() - 1]), None);
        assert_eq!(Pointer::decode(&[0, 0, 0]), None, "an inline value");
        assert_eq!(parse_file_name("20240913-17.dat"), Some((19_979, 17)));
        assert_eq!(file_name(19_979, 17), "20240913-17.dat");
        assert_eq!(parse_file_name("20240913.dat"), None);
        assert_eq!(parse_file_name("notes.txt"), None);
    }

    #[test]
    fn staged_bytes_read_back_after_their_append_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = PayloadFiles::open(dir.path().join("p")).unwrap();
        let day = 19_979;
        let a = Pointer::decode(&files.stage(day, &payload(b"first")).unwrap()).unwrap();
        let b = Pointer::decode(&files.stage(day, &payload(b"second")).unwrap()).unwrap();
        assert_eq!(read(&files.dir, day, &a).unwrap(), None, "not appended yet");
        files.append(false).unwrap();
        assert_eq!(read(&files.dir, day, &a).unwrap().unwrap(), "first");
        assert_eq!(read(&files.dir, day, &b).unwrap().unwrap(), "second");
        assert_eq!(b.offset_bytes, 5);
        // A batch given up leaves nothing behind to shift the next batch's offsets.
        files.begin_batch();
        files.stage(day, &payload(b"lost")).unwrap();
        files.abandon();
        let c = Pointer::decode(&files.stage(day, &payload(b"third")).unwrap()).unwrap();
        files.append(true).unwrap();
        assert_eq!(read(&files.dir, day, &c).unwrap().unwrap(), "third");
        assert_eq!(disk_bytes(&files.dir), 16);
    }

    #[test]
    fn a_batch_given_up_after_its_commit_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = PayloadFiles::open(dir.path().join("p")).unwrap();
        let day = 19_979;
        files.begin_batch();
        let a = Pointer::decode(&files.stage(day, &payload(b"named")).unwrap()).unwrap();
        files.append(false).unwrap();
        files.committed();
        // Persisting the commit failed: the batch is given up, but its pointers are in.
        files.abandon();
        assert_eq!(read(&files.dir, day, &a).unwrap().unwrap(), "named");
    }

    #[test]
    fn batches_larger_than_one_write_read_back_even_when_given_up_halfway() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = PayloadFiles::open(dir.path().to_path_buf()).unwrap();
        let day = 19_979;
        let body = |n: u8| Payload {
            content_encoding: None,
            content_type: None,
            truncated: false,
            body: vec![n; WRITE_BYTES / 2 + 1].into(),
        };
        let stage = |files: &mut PayloadFiles, n: u8| {
            Pointer::decode(&files.stage(day, &body(n)).unwrap()).unwrap()
        };
        let first = stage(&mut files, 0);
        files.append(false).unwrap();
        files.begin_batch();
        // The second body fills the buffer past one write: it reaches the file at once.
        let given_up = [stage(&mut files, 1), stage(&mut files, 2)];
        assert_eq!(disk_bytes(dir.path()), 3 * body(0).body.len() as u64);
        files.abandon();
        // The batch given up is cut off the file: tried again, its bytes are not there twice.
        assert_eq!(disk_bytes(dir.path()), body(0).body.len() as u64);
        let kept: Vec<Pointer> = (3..6).map(|n| stage(&mut files, n)).collect();
        files.append(false).unwrap();
        assert_eq!(kept[0].offset_bytes, given_up[0].offset_bytes);
        for (n, p) in (3..6).zip(&kept) {
            assert_eq!(read(dir.path(), day, p).unwrap().unwrap(), body(n).body);
        }
        assert_eq!(
            read(dir.path(), day, &first).unwrap().unwrap(),
            body(0).body
        );
        assert_eq!(disk_bytes(dir.path()), 4 * body(0).body.len() as u64);
    }

    #[test]
    fn bodies_handed_to_the_disk_and_dropped_from_the_cache_still_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = PayloadFiles::open(dir.path().to_path_buf()).unwrap();
        let day = 19_979;
        let body =
            |n: usize| -> bytes::Bytes { (0..300_000).map(|i| (i * 7 + n * 13) as u8).collect() };
        // 100 bodies of 300 kB in batches of 10: 30 MB, past three write-behind windows.
        let mut pointers = Vec::new();
        for batch in 0..10 {
            for n in batch * 10..batch * 10 + 10 {
                let p = Payload {
                    content_encoding: None,
                    content_type: None,
                    truncated: false,
                    body: body(n),
                };
                pointers.push(Pointer::decode(&files.stage(day, &p).unwrap()).unwrap());
            }
            files.append(false).unwrap();
        }
        let f = &files.open[&day];
        if cfg!(target_os = "linux") {
            assert!(
                f.dropped_bytes >= 2 * WRITE_BEHIND_BYTES,
                "{}",
                f.dropped_bytes
            );
            assert!(f.submitted_bytes > f.dropped_bytes);
        }
        for (n, p) in pointers.iter().enumerate() {
            assert_eq!(
                read(dir.path(), day, p).unwrap().unwrap(),
                body(n),
                "body {n}"
            );
        }
    }

    #[test]
    fn a_reopened_store_appends_to_new_files_and_leaves_unnamed_bytes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let day = 19_979;
        // Appended, then "killed" before any pointer was committed: the bytes stay, named by
        // nothing, until retention deletes the day.
        let (first, first_len) = {
            let mut files = PayloadFiles::open(dir.path().to_path_buf()).unwrap();
            let p = Pointer::decode(&files.stage(day, &payload(b"orphan")).unwrap()).unwrap();
            files.append(false).unwrap();
            (p, disk_bytes(dir.path()))
        };
        let mut files = PayloadFiles::open(dir.path().to_path_buf()).unwrap();
        let second = Pointer::decode(&files.stage(day, &payload(b"next")).unwrap()).unwrap();
        files.append(false).unwrap();
        assert!(second.file > first.file, "a new file, with a new number");
        assert_eq!(second.offset_bytes, 0);
        assert_eq!(read(dir.path(), day, &first).unwrap().unwrap(), "orphan");
        assert_eq!(read(dir.path(), day, &second).unwrap().unwrap(), "next");
        assert_eq!(disk_bytes(dir.path()), first_len + 4);
    }

    #[test]
    fn missing_or_short_files_and_garbled_lengths_read_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let day = 19_979;
        let mut files = PayloadFiles::open(dir.path().to_path_buf()).unwrap();
        let a = Pointer::decode(&files.stage(day, &payload(b"kept")).unwrap()).unwrap();
        let b = Pointer::decode(&files.stage(day, &payload(b"torn off")).unwrap()).unwrap();
        files.append(false).unwrap();
        let path = dir.path().join(file_name(day, a.file));
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(b.offset_bytes + 3)
            .unwrap();
        assert_eq!(read(dir.path(), day, &a).unwrap().unwrap(), "kept");
        assert_eq!(read(dir.path(), day, &b).unwrap(), None);
        let huge = Pointer {
            len_bytes: u64::MAX,
            ..a.clone()
        };
        assert_eq!(read(dir.path(), day, &huge).unwrap(), None);
        assert_eq!(read(dir.path(), day + 1, &a).unwrap(), None, "no such file");
    }
}
