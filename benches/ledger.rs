//! Cost of one admission decision plus its settlement in the quota ledger: alone, and with two
//! threads at once on different keys (no shared lock expected) and on the same key (one
//! account's mutex shared). Every limit is set so that every check runs.

use std::hint::black_box;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::quota::ledger::{Ledger, Limits, Today};

/// Shaped like the proxy's key: user id, service, method group.
type Key = (u64, &'static str, &'static str);

const POINTS_PER_CALL: u64 = 10;

fn limits() -> Limits {
    // High enough never to reject however long criterion runs.
    Limits {
        points_per_request: Some(1_000),
        points_per_day: Some(u64::MAX / 2),
        points_per_date_window: Some(u64::MAX / 2),
        date_window_days: 7,
        max_concurrent_execution: Some(64),
    }
}

fn today() -> Today {
    Today {
        day: 20_000,
        seconds_until_midnight: 3_600,
    }
}

fn admit_and_settle(ledger: &Ledger<Key>, key: &Key, limits: &Limits, now: Instant) {
    let lease = ledger
        .admit(black_box(key), limits, POINTS_PER_CALL, today(), now)
        .expect("bench limits never reject");
    lease.settle(black_box(true));
}

/// Runs `iterations` admit+settle on each of two threads at once and returns the slower
/// thread's time, so criterion reports the per-call latency under that contention.
fn two_threads(ledger: &Ledger<Key>, keys: [Key; 2], iterations: u64) -> Duration {
    let limits = limits();
    let start = Barrier::new(2);
    thread::scope(|scope| {
        let workers: Vec<_> = keys
            .iter()
            .map(|key| {
                let start = &start;
                let limits = &limits;
                scope.spawn(move || {
                    let now = Instant::now();
                    start.wait();
                    let began = Instant::now();
                    for _ in 0..iterations {
                        admit_and_settle(ledger, key, limits, now);
                    }
                    began.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("bench thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn ledger_benches(criterion: &mut Criterion) {
    let ledger: Ledger<Key> = Ledger::new(Duration::from_secs(300));
    let limits = limits();
    let first: Key = (1, "routing", "route");
    let second: Key = (2, "routing", "route");
    // Many other accounts, as in a running proxy.
    for user in 100..10_100 {
        ledger.restore((user, "routing", "route"), today().day, 5);
    }
    let now = Instant::now();

    let mut group = criterion.benchmark_group("ledger");
    group.bench_function("admit_settle_uncontended", |bencher| {
        bencher.iter(|| admit_and_settle(&ledger, &first, &limits, now))
    });
    group.bench_function("admit_settle_2_threads_different_keys", |bencher| {
        bencher.iter_custom(|iterations| two_threads(&ledger, [first, second], iterations))
    });
    group.bench_function("admit_settle_2_threads_same_key", |bencher| {
        bencher.iter_custom(|iterations| two_threads(&ledger, [first, first], iterations))
    });
    group.finish();
}

criterion_group!(benches, ledger_benches);
criterion_main!(benches);
