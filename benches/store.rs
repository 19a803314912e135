//! The audit store at scale: fills a temporary store with audit records through the same
//! background writer the proxy uses, then measures what the account API asks of it: a page
//! of audit (limit 100, with a filter, sorted by time, with its exact totals) for a USER, a
//! PARTNER and an ADMIN over a day and over the whole 90-day retention, a year of one user's
//! statistics, the bytes on disk per audit record after a flush and a major compaction, and
//! the store writer's CPU time per recorded call (the proxy's cores pay it).
//!
//! `TOLLGATE_BENCH_RECORDS` sets how many records (default 1,000,000; 10,000,000 fills in a
//! few minutes on two cores). The records are spread
//! over the 90 days of the default audit retention, in time order as a proxy writes them, over
//! 1,000 users in 50 companies; each user's charged points are spread over the last 365 days
//! so that a year of statistics has a row for every day. Calls carry no captured payload, so
//! the size is that of the audit record, its two visibility indexes, its process record and the
//! statistics. The figures of the fill and the size are printed before criterion's, after the
//! store writer's CPU per call for calls captured with two 10 KB bodies.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::model::{MethodGroup, ServiceName};
use tollgate::store::writer::{CallRecord, StoreWriter};
use tollgate::store::{
    day_of_ms, AuditQuery, AuditRecord, AuditSort, Payload, ProcessRecord, Store, Visibility,
};
use uuid::Uuid;

const USERS: usize = 1_000;
const COMPANIES: usize = 50;
const AUDIT_DAYS: i64 = 90;
const STATS_DAYS: usize = 365;
const DAY_MS: i64 = 86_400_000;
/// The user whose pages and statistics are measured.
const USER: usize = 7;

fn records() -> usize {
    std::env::var("TOLLGATE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn username(i: usize) -> String {
    format!("user{i:04}")
}

fn company(user: usize) -> String {
    format!("company_{:02}", user % COMPANIES)
}

/// splitmix64: deterministic and cheap.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn call(i: usize, n: usize, start_ms: i64, today: i32) -> CallRecord {
    let r = mix(i as u64);
    let user = i % USERS;
    let time_ms = start_ms + (i as i64 * AUDIT_DAYS * DAY_MS) / n as i64;
    let (service, method_group, operation) = match r % 10 {
        0..=5 => (
            ServiceName::UNIVERSAL,
            MethodGroup::PLAN,
            "run_plan_calculation",
        ),
        6..=8 => (
            ServiceName::ROUTING,
            MethodGroup::MATRIX,
            "run_matrix_calculation",
        ),
        _ => (
            ServiceName::ROUTING,
            MethodGroup::ROUTE,
            "run_route_calculation",
        ),
    };
    let points = (r >> 8) % 1000 + 1;
    let code = Uuid::from_u64_pair(mix(r), mix(r ^ 0x5555));
    CallRecord {
        findable: true,
        anonymous: false,
        audit: AuditRecord {
            code,
            username: username(user),
            company_key: company(user),
            service,
            operation: operation.into(),
            method_group,
            time_ms,
            timezone: 3,
            points,
            unique_points: points / 2 + 1,
            duration_us: (r >> 20) % 2_000_000,
            status: 200,
        },
        process: ProcessRecord {
            owner: username(user),
            company_key: company(user),
            day: day_of_ms(time_ms),
            exchanges: 1,
        },
        stage: 0,
        input: None,
        output: None,
        charged_day: Some(today - ((i / USERS) % STATS_DAYS) as i32),
    }
}

struct Filled {
    _dir: Dir,
    store: Arc<Store>,
    now_ms: i64,
    today: i32,
}

/// The store's folder: removed at the end unless `TOLLGATE_BENCH_KEEP` is set.
struct Dir(Option<tempfile::TempDir>);

impl Drop for Dir {
    fn drop(&mut self) {
        if std::env::var_os("TOLLGATE_BENCH_KEEP").is_some() {
            if let Some(d) = self.0.take() {
                let _ = d.keep();
            }
        }
    }
}

fn fill() -> Filled {
    let n = records();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = Store::open(dir.path()).expect("opening the store");
    let now_ms = Utc::now().timestamp_millis();
    let today = day_of_ms(now_ms);
    let start_ms = now_ms - AUDIT_DAYS * DAY_MS;
    let (writer, handle) =
        StoreWriter::start(store.clone(), Duration::from_millis(100), 65_536, false);
    let began = Instant::now();
    for i in 0..n {
        if let Err(full) = writer.try_record(call(i, n, start_ms, today)) {
            writer.record_blocking(full.0).expect("the writer runs");
        }
    }
    writer
        .flush_blocking(std::time::Duration::from_secs(600))
        .expect("the writer runs");
    let filled = began.elapsed();
    let writer_cpu = thread_cpu_named("store-writer");
    drop(writer);
    handle.join().expect("the writer thread ends");
    store.sync().expect("sync");
    let before = store.disk_bytes();
    let began = Instant::now();
    store.compact().expect("compaction");
    let compacted = began.elapsed();
    let after = store.disk_bytes();
    let audit_after = store.audit_disk_bytes();
    let on_disk = dir_bytes(dir.path());
    println!(
        "store fill: {n} records in {:.1} s ({:.0} records/s, {:.2} us/record wall through the \
         writer)",
        filled.as_secs_f64(),
        n as f64 / filled.as_secs_f64(),
        filled.as_secs_f64() * 1e6 / n as f64
    );
    match writer_cpu {
        Some(cpu) => println!(
            "store writer thread: {:.1} s CPU, {:.2} us/record",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / n as f64
        ),
        None => println!("store writer thread: CPU time not readable here"),
    }
    println!(
        "audit keyspaces (records, indexes, counters): {:.1} MiB after major compaction \
         ({:.0} B/record)",
        audit_after as f64 / (1 << 20) as f64,
        audit_after as f64 / n as f64
    );
    println!(
        "store size: {:.1} MiB after flush ({:.0} B/record), {:.1} MiB after major compaction \
         in {:.1} s ({:.0} B/record)",
        before as f64 / (1 << 20) as f64,
        before as f64 / n as f64,
        after as f64 / (1 << 20) as f64,
        compacted.as_secs_f64(),
        after as f64 / n as f64
    );
    println!(
        "store folder: {:.1} MiB allocated on disk after compaction ({:.0} B/record)",
        on_disk as f64 / (1 << 20) as f64,
        on_disk as f64 / n as f64
    );
    if std::env::var_os("TOLLGATE_BENCH_KEEP").is_some() {
        println!("store kept at {}", dir.path().display());
    }
    Filled {
        _dir: Dir(Some(dir)),
        store,
        now_ms,
        today,
    }
}

/// CPU time so far of `clock` (`CLOCK_THREAD_CPUTIME_ID`: the calling thread's,
/// `CLOCK_PROCESS_CPUTIME_ID`: every thread's).
fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(clock, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time (user + system) so far of this process's thread called `name`, from
/// `/proc/self/task` (Linux), in clock ticks of 10 ms: enough for a fill of seconds.
fn thread_cpu_named(name: &str) -> Option<Duration> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // The fields after the parenthesised name: state is the first, utime the 12th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        return Some(Duration::from_nanos(ticks * 1_000_000_000 / per_second));
    }
    None
}

/// Median thread CPU time of `f` over a few runs (fewer for slow ones).
fn median_cpu(mut f: impl FnMut()) -> Duration {
    let mut times = Vec::new();
    let began = Instant::now();
    while times.len() < 5 || (times.len() < 51 && began.elapsed() < Duration::from_secs(2)) {
        let t = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
        f();
        times.push(cpu_time(libc::CLOCK_THREAD_CPUTIME_ID) - t);
    }
    times.sort();
    times[times.len() / 2]
}

/// Bytes allocated on disk (as `du` counts them: the journal is preallocated sparse, so its
/// length overstates it) by every file under `path`.
fn dir_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A first page of records of ROUTING (some 40% of all), sorted by time.
fn page(visibility: Visibility, from_ms: i64, to_ms: i64) -> AuditQuery {
    AuditQuery {
        visibility,
        from_ms,
        to_ms,
        service: Some(ServiceName::ROUTING),
        operation: None,
        method_group: None,
        sort: AuditSort::Time,
        descending: false,
        offset: 0,
        limit: 100,
    }
}

/// Calls captured with two bodies of `PAYLOAD_BYTES` each, through the writer at some 10k calls
/// a second as a loaded proxy hands them over: the writer thread's CPU per call, and the whole
/// process's (fjall's background threads included, the memtables' later flush not).
const PAYLOAD_CALLS: usize = 20_000;
const PAYLOAD_BYTES: usize = 10_000;

fn payload_writer_cost() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let store = Store::open(dir.path()).expect("opening the store");
    let now_ms = Utc::now().timestamp_millis();
    let today = day_of_ms(now_ms);
    let body = bytes::Bytes::from(vec![b'x'; PAYLOAD_BYTES]);
    let calls: Vec<CallRecord> = (0..PAYLOAD_CALLS)
        .map(|i| {
            let mut c = call(i, PAYLOAD_CALLS, now_ms, today);
            // All of it today, a millisecond apart, as a proxy's calls: the fill's spread over
            // days and statistics is not what this measures.
            c.audit.time_ms = now_ms - PAYLOAD_CALLS as i64 + i as i64;
            c.process.day = day_of_ms(c.audit.time_ms);
            c.charged_day = Some(today);
            for p in [&mut c.input, &mut c.output] {
                *p = Some(Payload {
                    content_encoding: None,
                    content_type: Some("application/json".into()),
                    truncated: false,
                    body: body.clone(),
                });
            }
            c
        })
        .collect();
    let (writer, handle) =
        StoreWriter::start(store.clone(), Duration::from_millis(100), 65_536, false);
    let writer_before = thread_cpu_named("store-writer").unwrap_or_default();
    let process_before = cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID);
    for (i, c) in calls.into_iter().enumerate() {
        writer
            .record_blocking(Box::new(c))
            .expect("the writer runs");
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    writer
        .flush_blocking(std::time::Duration::from_secs(600))
        .expect("the writer runs");
    let writer_cpu = thread_cpu_named("store-writer").map(|t| t.saturating_sub(writer_before));
    let process = cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(process_before);
    drop(writer);
    handle.join().expect("the writer thread ends");
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / PAYLOAD_CALLS as f64;
    println!(
        "captured calls ({PAYLOAD_CALLS}, two {PAYLOAD_BYTES}-byte bodies each): store-writer \
         thread {}, whole process {:.1} us/call",
        writer_cpu
            .map(|d| format!("{:.1} us/call", per_call(d)))
            .unwrap_or_else(|| "not readable here".into()),
        per_call(process)
    );
}

fn bench(c: &mut Criterion) {
    payload_writer_cost();
    let f = fill();
    let (now, today) = (f.now_ms, f.today);
    let store = &f.store;
    let day_ago = now - DAY_MS;
    let whole = now - (AUDIT_DAYS + 1) * DAY_MS;
    let user = || Visibility::User(username(USER));
    let partner = || Visibility::Company(company(USER));
    let matrix = |q: AuditQuery| AuditQuery {
        service: None,
        method_group: Some(MethodGroup::MATRIX),
        ..q
    };
    let cases = [
        ("audit USER page, filter, today", page(user(), day_ago, now)),
        ("audit USER page, filter, 90 days", page(user(), whole, now)),
        (
            "audit USER page, method group filter, 90 days, DESC",
            AuditQuery {
                descending: true,
                ..matrix(page(user(), whole, now))
            },
        ),
        (
            "audit PARTNER page, filter, today",
            page(partner(), day_ago, now),
        ),
        (
            "audit PARTNER page, filter, 90 days",
            page(partner(), whole, now),
        ),
        (
            "audit PARTNER page, method group filter, 90 days, DESC",
            AuditQuery {
                descending: true,
                ..matrix(page(partner(), whole, now))
            },
        ),
        (
            "audit ADMIN page, filter, today",
            page(Visibility::All, day_ago, now),
        ),
        (
            "audit ADMIN page, filter, 90 days",
            page(Visibility::All, whole, now),
        ),
        (
            "audit ADMIN page, operation filter, 90 days, DESC, offset 5000",
            AuditQuery {
                service: None,
                operation: Some("run_route_calculation".into()),
                descending: true,
                offset: 5000,
                ..page(Visibility::All, whole, now)
            },
        ),
        (
            "audit ADMIN page, filter, today, sorted by points DESC",
            AuditQuery {
                sort: AuditSort::PointsCount,
                descending: true,
                ..page(Visibility::All, day_ago, now)
            },
        ),
    ];
    // Median CPU time of this thread per query: less swayed than wall time by whatever else
    // the machine runs at the same moment.
    for (name, q) in &cases {
        let p = store.audit(q).expect("audit");
        let cpu = median_cpu(|| {
            black_box(store.audit(q).expect("audit"));
        });
        println!(
            "{name}: {} of {} filtered of {} visible records in the window; median CPU {:.3} ms",
            p.records.len(),
            p.filter_total,
            p.overall_total,
            cpu.as_secs_f64() * 1000.0
        );
    }
    let year = store
        .stats(&username(USER), today - 364, today)
        .expect("stats");
    let year_cpu = median_cpu(|| {
        black_box(
            store
                .stats(&username(USER), today - 364, today)
                .expect("stats"),
        );
    });
    println!(
        "statistics, a year of {}: {} rows; median CPU {:.3} ms",
        username(USER),
        year.len(),
        year_cpu.as_secs_f64() * 1000.0
    );

    let mut group = c.benchmark_group("store");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    for (name, q) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| black_box(store.audit(black_box(q)).expect("audit")))
        });
    }
    group.bench_function("statistics, a year of one user", |b| {
        b.iter(|| {
            black_box(
                store
                    .stats(black_box(&username(USER)), today - 364, today)
                    .expect("stats"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
