//! Throughput of points counting on a large route body: 100 000 "locations", each an object
//! with a string key, coordinates, a duration and one time window (160 bytes each, 16 MB in
//! all). Three rules over the same body: a pointer that resolves nowhere (validating and
//! skipping alone, the floor under every rule), the locations compared whole (`unique_key_pointer`
//! None), and the locations compared by their "/key". `count_points` always counts both points
//! and unique points, so there is no cheaper "points only" mode to measure.
//!
//! Run: `cargo bench --bench points`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tollgate::quota::points::{count_points, Points, PointsRule};

const LOCATION_COUNT: usize = 100_000;

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
    group.finish();
}

criterion_group!(benches, bench_points);
criterion_main!(benches);
