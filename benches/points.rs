//! Throughput of points counting on a large route body: 100 000 "locations", each an object
//! with a string key, coordinates, a duration and one time window (160 bytes each, 16 MB in
//! all). Three rules over the same body: a pointer that resolves nowhere (validating and
//! skipping alone, the floor under every rule), the locations compared whole (`unique_key_pointer`
//! None), and the locations compared by their "/key". `count_points` always counts both points
//! and unique points, so there is no cheaper "points only" mode to measure.
//!
//! Then "unique_by_key" again, fed a prefix per 64 KiB as the proxy feeds a body arriving
//! (`PointsCount`), to show what counting during the receive costs beyond counting once.
//!
//! Then the cost of one call as the load bench (`benches/load/run.sh`) makes it: its ~10 KB POST
//! body of 100 locations of ~100 bytes, under its rule (`points = ["/locations"]`,
//! `unique_key = "/id"`). Here the per-call time is the figure to read: it is spent on the
//! proxy's request path, inside a per-call budget of about 50 us.
//!
//! Run: `cargo bench --bench points`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::quota::points::{count_points, Points, PointsCount, PointsRule};

const LOCATION_COUNT: usize = 100_000;

/// Locations in the load bench's POST body (its `LOCATIONS` default).
const LOAD_BENCH_LOCATION_COUNT: usize = 100;

fn locations_body(location_count: usize) -> Vec<u8> {
    let mut body = String::with_capacity(location_count * 160);
    body.push_str(r#"{"vehicles":[{"id":"van-1","capacity":[800]}],"locations":["#);
    for index in 0..location_count {
        if index > 0 {
            body.push(',');
        }
        // Coordinates vary so number scanning sees realistic digit counts.
        let latitude = 55.0 + (index % 997) as f64 / 1000.0;
        let longitude = 37.0 + (index % 991) as f64 / 1000.0;
        let duration_seconds = 300 + (index % 7) * 60;
        body.push_str(&format!(
            concat!(
                r#"{{"key":"loc-{:06}","latitude":{:.3},"longitude":{:.3},"duration":{},"#,
                r#""time_windows":[{{"from":"2024-02-21T09:00:00+03:00","to":"2024-02-21T18:00:00+03:00"}}]}}"#,
            ),
            index, latitude, longitude, duration_seconds
        ));
    }
    body.push_str(r#"],"options":{"routing_mode":"driving"}}"#);
    body.into_bytes()
}

/// The load bench's POST body, byte for byte as its `write_body` writes it.
fn load_bench_body(location_count: usize) -> Vec<u8> {
    let mut body = String::from(r#"{"locations":["#);
    for number in 1..=location_count {
        if number > 1 {
            body.push(',');
        }
        body.push_str(&format!(
            concat!(
                r#"{{"id":"loc-{:04}","point":{{"latitude":55.751244,"longitude":37.618423}},"#,
                r#""duration":"PT5M","demand":12}}"#,
            ),
            number
        ));
    }
    body.push_str("]}");
    body.into_bytes()
}

fn rule(array_pointer: &str, unique_key_pointer: Option<&str>) -> PointsRule {
    PointsRule {
        array_pointers: vec![array_pointer.to_string()],
        unique_key_pointer: unique_key_pointer.map(str::to_string),
    }
}

fn bench_points(c: &mut Criterion) {
    let body = locations_body(LOCATION_COUNT);
    let every_location = LOCATION_COUNT as u64;
    let cases = [
        ("validate_and_skip", rule("/missing", None), 0, 0),
        (
            "unique_by_whole_element",
            rule("/locations", None),
            every_location,
            every_location,
        ),
        (
            "unique_by_key",
            rule("/locations", Some("/key")),
            every_location,
            every_location,
        ),
    ];
    let mut group = c.benchmark_group("points");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.sample_size(20);
    for (name, rule, points, unique_points) in cases {
        // A bench of a wrong answer measures nothing.
        assert_eq!(
            count_points(&body, &rule),
            Ok(Points {
                points,
                unique_points
            }),
            "{name}"
        );
        group.bench_function(name, |b| {
            b.iter(|| count_points(black_box(&body), black_box(&rule)))
        });
    }
    // The same count fed as the proxy feeds it, a prefix per 64 KiB read: what counting as
    // the body arrives costs beyond counting it whole (the walks back to the counted array).
    let by_key = rule("/locations", Some("/key"));
    let fed = |body: &[u8]| {
        let mut count = PointsCount::new(&by_key);
        for end in (PIECE..body.len()).step_by(PIECE) {
            count.feed(&body[..end]);
        }
        count.finish(body)
    };
    assert_eq!(fed(&body), count_points(&body, &by_key));
    group.bench_function("unique_by_key_fed_per_64_KiB", |b| {
        b.iter(|| fed(black_box(&body)))
    });
    group.finish();
}

/// The size of the pieces a body is read in.
const PIECE: usize = 64 << 10;

fn bench_load_bench_call(c: &mut Criterion) {
    let body = load_bench_body(LOAD_BENCH_LOCATION_COUNT);
    let rule = rule("/locations", Some("/id"));
    let every_location = LOAD_BENCH_LOCATION_COUNT as u64;
    assert_eq!(
        count_points(&body, &rule),
        Ok(Points {
            points: every_location,
            unique_points: every_location
        })
    );
    let mut group = c.benchmark_group("points_per_call");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("load_bench_body_unique_by_id", |b| {
        b.iter(|| count_points(black_box(&body), black_box(&rule)))
    });
    group.finish();
}

criterion_group!(benches, bench_points, bench_load_bench_call);
criterion_main!(benches);
