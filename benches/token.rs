//! The cost of checking a token on the hot path of every proxied call: the HS256 signature,
//! algorithm and expiry (`Keys::verify`), then the directory lookup that checks the user still
//! exists and the token's version is current (`Authority::verify_token`), and the whole
//! `Authorization` header path the proxy calls (`Authority::authenticate`). The directory holds
//! 10 000 users in a real store. Target: under 5 µs per validation. A token is verified in full
//! on its first use (`token/keys_verify_first_use`) and remembered after that
//! (`token/keys_verify`).
//!
//! `parallel/*` runs the same validations on 1 and on 2 threads at once (each thread doing the
//! full iteration count; the time reported is wall time divided by the per-thread count): if no
//! lock serialised validations, 2 threads take about as long as 1 on a machine with 2 free cores.
//!
//! `failed_login/*` times a refused login (`Authority::login`, argon2id m=19 MiB t=2 p=1 on the
//! hashing pool) for an existing account with a wrong password and for an account that does
//! not exist: the two must take the same time, so that timing does not tell which accounts
//! exist.
//!
//! Run: `cargo bench --bench token`.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::auth::{Authority, Claims, Keys};
use tollgate::model::Role;
use tollgate::store::{Store, UserRecord};

const USERS: usize = 10_000;
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

struct Fixture {
    _dir: tempfile::TempDir,
    keys: Keys,
    authority: Arc<Authority>,
    token: String,
    header: Vec<u8>,
}

/// A USER of company acme whose tokens carry version 3.
fn acme_user(username: String, password_hash: String) -> UserRecord {
    UserRecord {
        username,
        password_hash,
        company_key: "acme".into(),
        roles: vec![Role::USER],
        name: None,
        email: None,
        phone: None,
        timezone: 0,
        token_version: 3,
        password_changed: false,
        quotas: Vec::new(),
        company_days_from: None,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = tollgate::config::parse("", dir.path()).expect("the empty config is valid");
    let store = Store::open(&dir.path().join("store")).unwrap();
    for i in 0..USERS {
        store
            .put_user(&acme_user(
                format!("user{i:05}"),
                // Never checked here: the hot path does not touch passwords.
                "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            ))
            .unwrap();
    }
    let keys = Keys::new(SECRET, &[]);
    let now = jsonwebtoken::get_current_timestamp();
    let token = keys.issue(&Claims {
        sub: format!("user{:05}", USERS / 2),
        company: "acme".into(),
        roles: vec![Role::USER],
        ver: 3,
        iat: now,
        exp: now + 86_400,
    });
    let authority = Authority::new(Keys::new(SECRET, &[]), store, &config.auth).unwrap();
    assert!(keys.verify(&token).is_ok());
    assert!(
        authority.verify_token(&token).is_ok(),
        "the fixture token must be valid"
    );
    let header = format!("Bearer {token}").into_bytes();
    Fixture {
        _dir: dir,
        keys,
        authority,
        token,
        header,
    }
}

/// Wall time of `threads` threads each validating `iters` times, started together.
fn parallel(authority: &Arc<Authority>, token: &str, threads: usize, iters: u64) -> Duration {
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (authority, token, start) = (authority.clone(), token.to_string(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..iters {
                    black_box(authority.verify_token(black_box(&token)).is_ok());
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    began.elapsed()
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One-off figure that a busy machine does not blur as much as wall time: with 1 and 2
/// threads validating at once, the CPU time each validation costs (a contended lock that
/// spins, or cache-line fights, would raise it) and how many threads made progress at once
/// (CPU time over wall time; a lock that parks would hold it at 1).
fn report_parallelism(authority: &Arc<Authority>, token: &str) {
    const N: u64 = 200_000;
    for threads in [1usize, 2] {
        let start = Arc::new(Barrier::new(threads + 1));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (authority, token, start) =
                    (authority.clone(), token.to_string(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let cpu = thread_cpu_time();
                    for _ in 0..N {
                        black_box(authority.verify_token(black_box(&token)).is_ok());
                    }
                    thread_cpu_time() - cpu
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        let cpu: Duration = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let wall = began.elapsed();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "parallelism/{threads}_threads: {:.2} us CPU per validation, {:.2} us wall per validation per thread, \
             {:.2} threads busy at once (load average {})",
            cpu.as_secs_f64() * 1e6 / (N * threads as u64) as f64,
            wall.as_secs_f64() * 1e6 / N as f64,
            cpu.as_secs_f64() / wall.as_secs_f64(),
            load.split_whitespace().next().unwrap_or("?"),
        );
    }
}

fn bench_token(c: &mut Criterion) {
    let f = fixture();
    report_parallelism(&f.authority, &f.token);
    let mut group = c.benchmark_group("token");
    group.bench_function("keys_verify_first_use", |b| {
        b.iter(|| black_box(f.keys.verify_in_full(black_box(&f.token)).is_ok()))
    });
    group.bench_function("keys_verify", |b| {
        b.iter(|| black_box(f.keys.verify(black_box(&f.token)).is_ok()))
    });
    group.bench_function("verify_and_directory", |b| {
        b.iter(|| black_box(f.authority.verify_token(black_box(&f.token)).is_ok()))
    });
    group.bench_function("authenticate_header", |b| {
        b.iter(|| black_box(f.authority.authenticate(Some(black_box(&f.header))).is_ok()))
    });
    group.bench_function("refuse_garbage", |b| {
        b.iter(|| black_box(f.authority.verify_token(black_box("a.b.c")).is_err()))
    });
    group.finish();

    let mut group = c.benchmark_group("parallel");
    for threads in [1, 2] {
        group.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| parallel(&f.authority, &f.token, threads, iters))
        });
    }
    group.finish();
}

fn bench_failed_logins(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    // Throttling would answer repeated failures early: measure the hashing, not the throttle.
    let config = tollgate::config::parse(
        "[auth]\nlogin_failures_per_account_per_minute = 100000\n\
         login_failures_per_address_per_minute = 100000\n",
        dir.path(),
    )
    .expect("the bench config is valid");
    let store = Store::open(&dir.path().join("store")).unwrap();
    store
        .put_user(&acme_user(
            "known".into(),
            tollgate::auth::password::hash("the-right-password"),
        ))
        .unwrap();
    let authority = Authority::new(Keys::new(SECRET, &[]), store, &config.auth).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = |username: &str| {
        let answer = rt.block_on(authority.login(username, "a-wrong-password", 3600, None));
        assert_eq!(answer.map_err(|e| e.status), Err(401));
    };
    let mut group = c.benchmark_group("failed_login");
    group.sample_size(20);
    group.bench_function("existing_user", |b| b.iter(|| refused("known")));
    group.bench_function("unknown_user", |b| b.iter(|| refused("nobody_here")));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_token, bench_failed_logins
}
criterion_main!(benches);
