//! Points and quotas, black-box against the real binary and its demo upstream: admission
//! (402/429 before the upstream), exact daily budgets, concurrency slots under load and client
//! aborts, refunds when the upstream fails, counters across kill -9, day boundaries by the
//! user's timezone, invalid bodies, and per-company/per-user overrides.

mod common;
use common::*;

use std::collections::HashMap;
use std::io::Read;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

const PLAN: &str = "/universal/plan/calculation";
const MATRIX: &str = "/routing/matrix/calculation";

/// A plan body with `n` locations (n points, n unique points).
fn plan(n: usize) -> Value {
    let locations: Vec<Value> = (0..n).map(|i| json!({"key": format!("loc-{i}")})).collect();
    json!({ "locations": locations })
}

fn matrix(n: usize) -> Value {
    let waypoints: Vec<Value> = (0..n)
        .map(|i| json!({"latitude": i, "longitude": i}))
        .collect();
    json!({ "waypoints": waypoints })
}

fn quota_table(service: &str, group: &str, scope: &str, values: &str) -> String {
    format!(
        "\n[[quotas]]\nservice = \"{service}\"\nmethod_group = \"{group}\"\n{scope}\n{values}\n"
    )
}

/// POSTs a plan of `n` points with extra headers.
fn call_plan(
    t: &Tollgate,
    token: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> reqwest::blocking::Response {
    let mut rb = client().post(t.url(PLAN)).bearer_auth(token).json(&plan(n));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().unwrap()
}

fn header<'a>(r: &'a reqwest::blocking::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// How many requests for `path` the demo upstream has seen.
fn demo_requests(t: &Tollgate, path: &str) -> u64 {
    t.demo_stats()["requests"][path].as_u64().unwrap_or(0)
}

/// Points per local date for one (service, method group) from GET /account/statistics, over
/// a period wide enough to hold today in any timezone.
fn statistics(t: &Tollgate, token: &str, service: &str, group: &str) -> Vec<(String, u64)> {
    let today = chrono::Utc::now().date_naive();
    let from = (today - chrono::Duration::days(3)).format("%Y-%m-%d");
    let to = (today + chrono::Duration::days(3)).format("%Y-%m-%d");
    let r = t.get(&format!("/account/statistics?from={from}&to={to}"), token);
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    let mut out = Vec::new();
    for date in body["dates"].as_array().unwrap() {
        for s in date["services"].as_array().unwrap() {
            if s["service"] != service {
                continue;
            }
            for m in s["methods"].as_array().unwrap() {
                if m["method_group"] == group {
                    out.push((
                        date["date"].as_str().unwrap().to_string(),
                        m["points_per_day"].as_u64().unwrap(),
                    ));
                }
            }
        }
    }
    out
}

fn statistics_total(t: &Tollgate, token: &str, service: &str, group: &str) -> u64 {
    statistics(t, token, service, group)
        .iter()
        .map(|(_, p)| p)
        .sum()
}

/// The value of an unlabelled metric line `name value`.
fn metric(t: &Tollgate, name: &str) -> Option<f64> {
    t.metrics().lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The value of `name{label="value"}`, 0 when absent.
fn labelled_metric(t: &Tollgate, name: &str, label: &str, value: &str) -> f64 {
    let prefix = format!("{name}{{{label}=\"{value}\"}}");
    t.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn assert_ratelimit_headers(r: &reqwest::blocking::Response, limit: u64, remaining: Option<u64>) {
    let policy = header(r, "ratelimit-policy")
        .unwrap_or_else(|| panic!("no RateLimit-Policy on {}", r.status()));
    // Named by the quota it is, with its window in seconds.
    let name = if policy.starts_with("\"points_per_day\";") {
        assert_eq!(policy, format!("\"points_per_day\";q={limit};w=86400"));
        "\"points_per_day\";"
    } else {
        let window = policy
            .strip_prefix(&format!("\"points_per_date_window\";q={limit};w="))
            .unwrap_or_else(|| panic!("RateLimit-Policy {policy:?}, expected a limit of {limit}"));
        let days = window.parse::<u64>().unwrap() / 86_400;
        assert!(
            days >= 2 && window == (days * 86_400).to_string(),
            "{policy}"
        );
        "\"points_per_date_window\";"
    };
    let rl = header(r, "ratelimit").unwrap_or_else(|| panic!("no RateLimit on {}", r.status()));
    assert!(
        rl.starts_with(&format!("{name}r=")),
        "{rl} (policy {policy})"
    );
    let fields: HashMap<&str, u64> = rl
        .trim_start_matches(name)
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    assert!(fields["t"] >= 1 && fields["t"] <= 86_400, "{rl}");
    if let Some(remaining) = remaining {
        assert_eq!(fields["r"], remaining, "{rl}");
    }
}

#[test]
fn over_points_per_request_is_402_never_forwarded_and_ratelimit_headers_are_sent() {
    let t = Tollgate::start_extra(&quota_table(
        "UNIVERSAL",
        "PLAN",
        "",
        "points_per_request = 5\npoints_per_day = 100",
    ));
    let alice = t.token("alice");

    let r = call_plan(&t, &alice, 6, &[]);
    assert_eq!(r.status(), 402);
    assert_ratelimit_headers(&r, 100, Some(100));
    assert!(header(&r, "x-tracecode").is_some());
    let body: Value = r.json().unwrap();
    assert_error_shape(&body, "UNIVERSAL");
    assert_eq!(body["tracedata"]["client"], "acme_|_alice");
    assert_eq!(body["tracedata"]["operation"], "run_plan_calculation");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("points_per_request") && message.contains('6') && message.contains('5'),
        "{message}"
    );
    assert_eq!(
        demo_requests(&t, PLAN),
        0,
        "a rejected call reached the upstream"
    );

    // Exactly the per-request limit passes, and the answer carries what is left today.
    let r = call_plan(&t, &alice, 5, &[]);
    assert_eq!(r.status(), 200);
    assert_ratelimit_headers(&r, 100, Some(95));
    assert_eq!(demo_requests(&t, PLAN), 1);
    let r = call_plan(&t, &alice, 2, &[]);
    assert_eq!(r.status(), 200);
    assert_ratelimit_headers(&r, 100, Some(93));
    // The rejected call cost nothing.
    assert_eq!(statistics_total(&t, &alice, "UNIVERSAL", "PLAN"), 7);
    assert_eq!(
        labelled_metric(
            &t,
            "tollgate_rejections_total",
            "reason",
            "points_per_request"
        ),
        1.0
    );
}

#[test]
fn the_daily_quota_runs_out_exactly_at_the_limit() {
    let t = Tollgate::start_extra(&quota_table("UNIVERSAL", "PLAN", "", "points_per_day = 10"));
    let bob = t.token("bob");
    for i in 1..=3u64 {
        let r = call_plan(&t, &bob, 3, &[]);
        assert_eq!(r.status(), 200, "call {i}");
        assert_ratelimit_headers(&r, 10, Some(10 - 3 * i));
    }
    // 9 used: 3 more would make 12.
    let r = call_plan(&t, &bob, 3, &[]);
    assert_eq!(r.status(), 402);
    assert_ratelimit_headers(&r, 10, Some(1));
    let body: Value = r.json().unwrap();
    assert_error_shape(&body, "UNIVERSAL");
    assert!(
        body["message"].as_str().unwrap().contains("points_per_day"),
        "{body}"
    );
    // One point still fits, exactly to 10.
    let r = call_plan(&t, &bob, 1, &[]);
    assert_eq!(r.status(), 200);
    assert_ratelimit_headers(&r, 10, Some(0));
    let r = call_plan(&t, &bob, 1, &[]);
    assert_eq!(r.status(), 402);
    assert_ratelimit_headers(&r, 10, Some(0));
    // A zero-point call still fits a spent day (it costs nothing).
    assert_eq!(call_plan(&t, &bob, 0, &[]).status(), 200);
    assert_eq!(demo_requests(&t, PLAN), 5);
    assert_eq!(statistics_total(&t, &bob, "UNIVERSAL", "PLAN"), 10);
    // Another user of the same company has a budget of their own.
    let alice = t.token("alice");
    assert_eq!(call_plan(&t, &alice, 10, &[]).status(), 200);
}

#[test]
fn a_thousand_parallel_calls_never_exceed_the_slots_or_the_daily_points() {
    const CALLS: usize = 1000;
    const THREADS: usize = 64;
    const SLOTS: u64 = 5;
    const BUDGET: u64 = 300;
    let t = Tollgate::start_extra(&quota_table(
        "UNIVERSAL",
        "PLAN",
        "",
        &format!("points_per_day = {BUDGET}\nmax_concurrent_execution = {SLOTS}"),
    ));
    let alice = t.token("alice");
    let next = AtomicUsize::new(0);
    let ok = AtomicUsize::new(0);
    let payment = AtomicUsize::new(0);
    let too_many = AtomicUsize::new(0);
    let unexpected: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = serde_json::to_vec(&plan(1)).unwrap();
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let c = client();
                let mut rng = rand::thread_rng();
                while next.fetch_add(1, Ordering::SeqCst) < CALLS {
                    // Retry on 429 until the call is admitted or the day's points are gone.
                    loop {
                        if Instant::now() > deadline {
                            unexpected.lock().unwrap().push("deadline passed".into());
                            return;
                        }
                        let r = c
                            .post(t.url(PLAN))
                            .bearer_auth(&alice)
                            .header("content-type", "application/json")
                            .header("x-demo-delay-ms", rng.gen_range(20..=50).to_string())
                            .body(body.clone())
                            .send();
                        let r = match r {
                            Ok(r) => r,
                            Err(e) => {
                                unexpected.lock().unwrap().push(format!("transport: {e}"));
                                break;
                            }
                        };
                        match r.status().as_u16() {
                            200..=299 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            402 => {
                                payment.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            429 => {
                                too_many.fetch_add(1, Ordering::SeqCst);
                                let retry =
                                    header(&r, "retry-after").and_then(|v| v.parse::<u64>().ok());
                                if retry.is_none_or(|s| s < 1) {
                                    unexpected.lock().unwrap().push(format!(
                                        "429 without Retry-After: {:?}",
                                        r.headers()
                                    ));
                                }
                                if header(&r, "ratelimit").is_none()
                                    || header(&r, "ratelimit-policy").is_none()
                                {
                                    unexpected
                                        .lock()
                                        .unwrap()
                                        .push("429 without RateLimit headers".into());
                                }
                                let body: Value = r.json().unwrap_or(Value::Null);
                                if !body["message"]
                                    .as_str()
                                    .is_some_and(|m| m.contains("max_concurrent_execution"))
                                {
                                    unexpected.lock().unwrap().push(format!("429 body: {body}"));
                                }
                                std::thread::sleep(Duration::from_millis(rng.gen_range(2..=10)));
                            }
                            other => {
                                unexpected.lock().unwrap().push(format!("status {other}"));
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    let unexpected = unexpected.into_inner().unwrap();
    assert!(
        unexpected.is_empty(),
        "{} unexpected outcomes, first: {:?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    let (ok, payment, too_many) = (ok.into_inner(), payment.into_inner(), too_many.into_inner());
    eprintln!("parallel: {ok} admitted, {payment} x 402, {too_many} x 429");
    assert_eq!(
        ok as u64, BUDGET,
        "admitted calls must be exactly the daily points"
    );
    assert_eq!(ok + payment, CALLS);
    assert!(
        too_many > 0,
        "the concurrency limit never bit: the test did not test it"
    );
    let stats = t.demo_stats();
    let peak = stats["peak_in_flight"].as_u64().unwrap();
    assert!(
        peak <= SLOTS,
        "the upstream saw {peak} calls at once, the quota allows {SLOTS}"
    );
    assert!(peak >= 2, "calls did not overlap at all (peak {peak})");
    assert_eq!(
        stats["requests"][PLAN].as_u64().unwrap(),
        BUDGET,
        "rejected calls reached the upstream"
    );
    assert_eq!(statistics_total(&t, &alice, "UNIVERSAL", "PLAN"), BUDGET);
    assert_eq!(
        labelled_metric(
            &t,
            "tollgate_rejections_total",
            "reason",
            "max_concurrent_execution"
        ),
        too_many as f64
    );
    assert_eq!(
        labelled_metric(&t, "tollgate_rejections_total", "reason", "points_per_day"),
        payment as f64
    );
}

/// Sends one proxied plan call on a raw connection and drops it after `hold`, unread.
fn abandoned_call(port: u16, token: &str, delay_ms: u64, hold: Duration) {
    let body = serde_json::to_vec(&plan(1)).unwrap();
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let head = format!(
        "POST {PLAN} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         x-demo-delay-ms: {delay_ms}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body);
    std::thread::sleep(hold);
    drop(s);
}

#[test]
fn clients_that_abort_mid_call_leak_no_slot() {
    const CALLS: usize = 1000;
    const THREADS: usize = 50;
    const SLOTS: usize = 5;
    let t = Tollgate::start_extra(&quota_table(
        "UNIVERSAL",
        "PLAN",
        "",
        &format!("max_concurrent_execution = {SLOTS}"),
    ));
    let alice = t.token("alice");
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let mut rng = rand::thread_rng();
                while next.fetch_add(1, Ordering::SeqCst) < CALLS {
                    abandoned_call(
                        t.port,
                        &alice,
                        200,
                        Duration::from_millis(rng.gen_range(0..150)),
                    );
                }
            });
        }
    });
    assert!(
        eventually(Duration::from_secs(15), || t.demo_stats()["in_flight"] == 0),
        "the upstream still has calls in flight: {}",
        t.demo_stats()
    );
    assert!(
        eventually(Duration::from_secs(15), || metric(
            &t,
            "tollgate_in_flight_requests"
        ) == Some(0.0)),
        "tollgate_in_flight_requests stays at {:?}",
        metric(&t, "tollgate_in_flight_requests")
    );
    // Every call that reached the upstream was abandoned before its 200 ms answer.
    let stats = t.demo_stats();
    let reached = stats["requests"][PLAN].as_u64().unwrap_or(0);
    eprintln!("aborts: {reached} of {CALLS} abandoned calls reached the upstream");
    assert!(
        reached > 0,
        "no aborted call reached the upstream: the test did not test it"
    );
    assert!(
        stats["peak_in_flight"].as_u64().unwrap() <= SLOTS as u64,
        "{stats}"
    );

    // Every slot is free: a burst of SLOTS calls is admitted at once, one more is not.
    t.demo_reset();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..SLOTS)
            .map(|_| {
                s.spawn(|| {
                    call_plan(&t, &alice, 1, &[("x-demo-delay-ms", "1500")])
                        .status()
                        .as_u16()
                })
            })
            .collect();
        assert!(
            eventually(Duration::from_secs(5), || t.demo_stats()["in_flight"]
                == SLOTS),
            "the burst did not reach the upstream together: {}",
            t.demo_stats()
        );
        let extra = call_plan(&t, &alice, 1, &[]);
        assert_eq!(
            extra.status(),
            429,
            "a slot beyond max_concurrent_execution was granted"
        );
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, vec![200; SLOTS]);
    assert_eq!(t.demo_stats()["peak_in_flight"], SLOTS);
    assert!(eventually(Duration::from_secs(5), || metric(
        &t,
        "tollgate_in_flight_requests"
    ) == Some(0.0)));
}

/// An upstream that answers every call with 64 MiB, and counts the answers it could not
/// finish because Tollgate closed the connection.
struct HugeUpstream {
    port: u16,
    cut_off: Arc<AtomicUsize>,
}

impl HugeUpstream {
    fn start() -> HugeUpstream {
        const SIZE: usize = 64 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_off = Arc::new(AtomicUsize::new(0));
        let counted = cut_off.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut request = [0u8; 65536];
                    let _ = stream.read(&mut request);
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
                    let block = vec![b'x'; 1 << 20];
                    let whole = stream.write_all(head.as_bytes()).is_ok()
                        && (0..SIZE / block.len()).all(|_| stream.write_all(&block).is_ok());
                    if !whole {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        HugeUpstream { port, cut_off }
    }
}

#[test]
fn a_caller_that_stops_reading_is_cut_off_at_the_total_timeout_and_frees_its_slot() {
    let huge = HugeUpstream::start();
    let mut extra = quota_table("UNIVERSAL", "PLAN", "", "max_concurrent_execution = 1");
    // 500 ms from connect to the answer's last byte.
    extra.push_str(&failing_plan_routes(&[("huge", huge.port)]));
    let t = Tollgate::start_extra(&extra);
    let alice = t.token("alice");
    let body = serde_json::to_vec(&plan(2)).unwrap();
    let mut caller = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    let head = format!(
        "POST /universal/plan/huge HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {alice}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    caller.write_all(head.as_bytes()).unwrap();
    caller.write_all(&body).unwrap();
    // The caller reads nothing: what the kernel buffers fills, and Tollgate's writes wait.
    assert!(
        eventually(Duration::from_secs(10), || huge
            .cut_off
            .load(Ordering::SeqCst)
            == 1),
        "Tollgate still holds the upstream's answer for a caller that stopped reading"
    );
    assert!(eventually(Duration::from_secs(5), || metric(
        &t,
        "tollgate_in_flight_requests"
    ) == Some(0.0)));
    // The slot is free while the stuck caller is still connected.
    assert_eq!(call_plan(&t, &alice, 1, &[]).status(), 200);
    // And its connection was closed: what it can still read ends, cut short.
    let received = read_until_closed(&mut caller, Duration::from_secs(10));
    assert!(received < 64 << 20, "{received} bytes");
}

#[test]
fn points_of_failed_upstream_calls_are_refunded() {
    let closing = FaultUpstream::start(Fault::CloseSilently);
    let hanging = FaultUpstream::start(Fault::Hang);
    let down = free_port();
    let mut extra = quota_table("UNIVERSAL", "PLAN", "", "points_per_day = 10");
    extra.push_str(&failing_plan_routes(&[
        ("down", down),
        ("closing", closing.port),
        ("hanging", hanging.port),
    ]));
    let t = Tollgate::start_extra(&extra);
    let alice = t.token("alice");

    // The upstream answers an error: proxied as is, not charged, and its RateLimit says so.
    for status in ["500", "503", "400"] {
        let r = call_plan(&t, &alice, 10, &[("x-demo-status", status)]);
        assert_eq!(r.status().as_u16().to_string(), status);
        assert_ratelimit_headers(&r, 10, Some(10));
    }
    assert_eq!(demo_requests(&t, PLAN), 3);
    // The upstream is down, closes without a word, or never answers.
    for (name, expected) in [("down", 502), ("closing", 502), ("hanging", 504)] {
        let r = client()
            .post(t.url(&format!("/universal/plan/{name}")))
            .bearer_auth(&alice)
            .json(&plan(10))
            .send()
            .unwrap();
        assert_eq!(r.status(), expected, "{name}");
        // Tollgate's own answer says what is left, the call's points given back.
        assert_ratelimit_headers(&r, 10, Some(10));
        let body: Value = r.json().unwrap();
        assert_error_shape(&body, "UNIVERSAL");
    }
    assert_eq!(
        statistics_total(&t, &alice, "UNIVERSAL", "PLAN"),
        0,
        "failed calls were charged"
    );
    // The whole day's budget is intact.
    let r = call_plan(&t, &alice, 10, &[]);
    assert_eq!(r.status(), 200);
    assert_eq!(call_plan(&t, &alice, 1, &[]).status(), 402);
    assert_eq!(statistics_total(&t, &alice, "UNIVERSAL", "PLAN"), 10);
}

#[test]
fn an_answers_ratelimit_says_what_is_left_when_it_goes_out() {
    // A slow call admitted first, a quick one settled while it runs: the slow call's answer
    // counts the quick one's points, not what was left at its admission.
    let mut extra = quota_table("UNIVERSAL", "PLAN", "", "points_per_day = 30");
    extra.push_str(&failing_plan_routes(&[("down", free_port())]));
    let t = Tollgate::start_extra(&extra);
    let alice = t.token("alice");
    let slow = {
        let (url, token) = (t.url(PLAN), alice.clone());
        std::thread::spawn(move || {
            let r = client()
                .post(url)
                .bearer_auth(token)
                .header("x-demo-delay-ms", "1500")
                .header("x-demo-status", "500")
                .json(&plan(1))
                .send()
                .unwrap();
            let rl = header(&r, "ratelimit").map(str::to_string);
            (r.status().as_u16(), rl)
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || t.demo_stats()["in_flight"] == 1),
        "the slow call never reached the upstream"
    );
    let quick = call_plan(&t, &alice, 5, &[]);
    assert_eq!(quick.status(), 200);
    // 30, less the slow call's point (reserved) and the quick call's 5.
    assert_ratelimit_headers(&quick, 30, Some(24));
    let (status, rl) = slow.join().unwrap();
    assert_eq!(status, 500);
    // Its 500 gives its point back: 30 less the quick call's 5.
    let rl = rl.expect("a RateLimit field on the slow answer");
    assert!(rl.contains(";r=25;"), "{rl}");
    // Tollgate's own 502 says the same: its call's 3 points are given back once, not twice.
    let r = client()
        .post(t.url("/universal/plan/down"))
        .bearer_auth(&alice)
        .json(&plan(3))
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_ratelimit_headers(&r, 30, Some(25));
}

#[test]
fn a_route_with_requests_per_second_limits_each_user_apart() {
    let t = Tollgate::start_extra(
        r#"
[[routes]]
method = "POST"
path = "/routing/route/calculation"
upstream = "demo"
service = "ROUTING"
method_group = "ROUTE"
operation = "run_route_calculation"
requests_per_second = 2
"#,
    );
    let (alice, bob) = (t.token("alice"), t.token("bob"));
    let call = |token: &str| {
        client()
            .post(t.url("/routing/route/calculation"))
            .bearer_auth(token)
            .json(&json!({"waypoints": [{}, {}]}))
            .send()
            .unwrap()
    };
    let before = demo_requests(&t, "/routing/route/calculation");
    // Two calls a second, a burst of two: calls in quick succession soon meet the limit.
    let mut statuses = Vec::new();
    let refused = loop {
        let r = call(&alice);
        if r.status() == 429 {
            break r;
        }
        statuses.push(r.status().as_u16());
        assert!(statuses.len() < 20, "never limited: {statuses:?}");
    };
    assert!(statuses.len() >= 2, "limited too soon: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let wait: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        header(&refused, "ratelimit-policy"),
        Some("\"requests_per_second\";q=2;w=1")
    );
    assert_eq!(
        header(&refused, "ratelimit"),
        Some(format!("\"requests_per_second\";r=0;t={wait}").as_str())
    );
    let body: Value = refused.json().unwrap();
    assert_error_shape(&body, "ROUTING");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("requests_per_second"),
        "{body}"
    );
    // Refused calls never reached the upstream; another user has a budget of their own.
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(
        demo_requests(&t, "/routing/route/calculation") - before,
        admitted
    );
    assert_eq!(call(&bob).status(), 200);
    // A second later alice may call again.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(call(&alice).status(), 200);
}

#[test]
fn an_answer_cut_off_by_the_upstream_is_refunded() {
    let resetting = FaultUpstream::start(Fault::ResetMidResponse);
    let mut extra = quota_table("UNIVERSAL", "PLAN", "", "points_per_day = 10");
    extra.push_str(&format!(
        r#"
[[upstreams]]
name = "resetting"
address = "127.0.0.1:{}"
connect_timeout_ms = 300
total_timeout_ms = 2000

[[routes]]
method = "POST"
path = "/universal/plan/resetting"
upstream = "resetting"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "run_plan_resetting"
points = ["/locations"]
"#,
        resetting.port
    ));
    let t = Tollgate::start_extra(&extra);
    let alice = t.token("alice");
    // The caller gets a 200 head and a truncated body: the result never arrived.
    let r = client()
        .post(t.url("/universal/plan/resetting"))
        .bearer_auth(&alice)
        .json(&plan(10))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().is_err(), "the body should end early");
    assert_eq!(
        statistics_total(&t, &alice, "UNIVERSAL", "PLAN"),
        0,
        "a call whose answer the upstream broke off was charged"
    );
    assert_eq!(call_plan(&t, &alice, 10, &[]).status(), 200);
}

#[test]
fn counters_survive_kill_9_and_restart() {
    let mut t = Tollgate::start_extra(&quota_table("UNIVERSAL", "PLAN", "", "points_per_day = 10"));
    let alice = t.token("alice");
    assert_eq!(call_plan(&t, &alice, 4, &[]).status(), 200);
    assert_eq!(call_plan(&t, &alice, 3, &[]).status(), 200);
    // Longer than the 20 ms flush interval; no account read forces a flush here.
    std::thread::sleep(Duration::from_millis(500));
    t.kill9();
    t.spawn();
    let alice = t.token("alice");
    // 7 spent before the crash: 4 more do not fit, 3 do.
    let r = call_plan(&t, &alice, 4, &[]);
    assert_eq!(r.status(), 402, "the crash handed out a fresh day budget");
    assert_ratelimit_headers(&r, 10, Some(3));
    assert_eq!(call_plan(&t, &alice, 3, &[]).status(), 200);
    assert_eq!(call_plan(&t, &alice, 1, &[]).status(), 402);
    assert_eq!(statistics_total(&t, &alice, "UNIVERSAL", "PLAN"), 10);
    // And once more, across a graceful stop.
    assert_eq!(t.terminate(), Some(0));
    t.spawn();
    let alice = t.token("alice");
    assert_eq!(call_plan(&t, &alice, 1, &[]).status(), 402);
    assert_eq!(statistics_total(&t, &alice, "UNIVERSAL", "PLAN"), 10);
}

/// With `durability = "strict"` every call's charge or refund and its record are on disk
/// before its caller hears the end of the answer: a kill -9 right after loses none, whatever
/// the flush interval (10 s here), also for calls whose upstream failed.
#[test]
fn strict_durability_keeps_answered_and_failed_calls_through_kill_9() {
    let down = free_port();
    let mut extra = quota_table("UNIVERSAL", "PLAN", "", "points_per_day = 10");
    extra.push_str(&failing_plan_routes(&[("down", down)]));
    let mut t = start_with_config_edit(
        Setup {
            extra,
            ..Setup::default()
        },
        |c| {
            c.replace(
                "flush_interval_ms = 20",
                "flush_interval_ms = 10000\ndurability = \"strict\"",
            )
        },
    );
    let alice = t.token("alice");
    assert_eq!(call_plan(&t, &alice, 4, &[]).status(), 200);
    let r = client()
        .post(t.url("/universal/plan/down"))
        .bearer_auth(&alice)
        .json(&json!({"locations": [1, 2]}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    // An answer without a body ends with its head: the record must be on disk before it.
    let r = call_plan(&t, &alice, 3, &[("x-demo-status", "204")]);
    assert_eq!(r.status(), 204);
    t.kill9();
    t.spawn();
    let alice = t.token("alice");
    assert_eq!(statistics_total(&t, &alice, "UNIVERSAL", "PLAN"), 7);
    let audit: Value = t.get("/account/audit", &alice).json().unwrap();
    let statuses: Vec<u64> = audit["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 502, 204], "{audit}");
    // 7 of 10 spent: 3 more fit, 4 do not.
    assert_eq!(call_plan(&t, &alice, 4, &[]).status(), 402);
    assert_eq!(call_plan(&t, &alice, 3, &[]).status(), 200);
}

fn set_timezone(t: &Tollgate, token: &str, username: &str, timezone: i32) {
    let r = client()
        .put(t.url("/account/info"))
        .bearer_auth(token)
        .json(&json!({"username": username, "company_key": "acme", "timezone": timezone}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
}

/// No clock can be moved in the binary, but the local day is the user's: at UTC-12 and UTC+12
/// the same instant falls on two consecutive days, whatever the hour. (Midnight itself is covered
/// by the unit tests of `quota::ledger`.)
#[test]
fn the_daily_budget_and_the_date_window_follow_the_users_local_day() {
    let mut extra = quota_table("UNIVERSAL", "PLAN", "", "points_per_day = 10");
    extra.push_str(&quota_table(
        "ROUTING",
        "MATRIX",
        "",
        "points_per_date_window = 15\ndate_window_days = 2",
    ));
    let t = Tollgate::start_extra(&extra);
    let bob = t.token("bob");
    let matrix_call = |n: usize| t.post_json(MATRIX, &bob, &matrix(n)).status().as_u16();

    set_timezone(&t, &bob, "bob", -12);
    assert_eq!(call_plan(&t, &bob, 10, &[]).status(), 200);
    assert_eq!(call_plan(&t, &bob, 1, &[]).status(), 402);
    assert_eq!(matrix_call(10), 200);

    // The next local day: a fresh daily budget, but the 2-day window still holds yesterday's 10.
    set_timezone(&t, &bob, "bob", 12);
    let r = call_plan(&t, &bob, 10, &[]);
    assert_eq!(
        r.status(),
        200,
        "the next local day did not bring a fresh daily budget"
    );
    assert_eq!(call_plan(&t, &bob, 1, &[]).status(), 402);
    assert_eq!(
        matrix_call(6),
        402,
        "the date window forgot the previous day"
    );
    assert_eq!(matrix_call(5), 200);
    assert_eq!(matrix_call(1), 402);

    // Back to the earlier day: it is still spent.
    set_timezone(&t, &bob, "bob", -12);
    assert_eq!(call_plan(&t, &bob, 1, &[]).status(), 402);
    assert_eq!(matrix_call(1), 402);

    // Setting the clock back is no fresh budget either: spent at UTC+12, alice's day goes on
    // at UTC-12 (where the local date is the day before) until the local day catches up.
    let alice = t.token("alice");
    set_timezone(&t, &alice, "alice", 12);
    assert_eq!(call_plan(&t, &alice, 10, &[]).status(), 200);
    assert_eq!(call_plan(&t, &alice, 1, &[]).status(), 402);
    set_timezone(&t, &alice, "alice", -12);
    let r = call_plan(&t, &alice, 1, &[]);
    assert_eq!(
        r.status(),
        402,
        "moving the timezone back opened a fresh daily budget"
    );
    let reset: u64 = header(&r, "retry-after")
        .or_else(|| header(&r, "ratelimit").and_then(|v| v.split("t=").nth(1)))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reset time in {:?}", r.headers()));
    assert!(
        reset > 86_400,
        "the continued day ends at its own midnight, a day after UTC-12's: {reset}"
    );
    let days = statistics(&t, &alice, "UNIVERSAL", "PLAN");
    assert_eq!(days.len(), 1, "{days:?}");
    // A period left to its default (this month so far) ends on the continued day, a date
    // ahead of alice's local one: its points show at once, in statistics and in the report.
    let body: Value = t.get("/account/statistics", &alice).json().unwrap();
    let shown: Vec<&Value> = body["dates"].as_array().unwrap().iter().collect();
    assert_eq!(shown.len(), 1, "{body}");
    assert_eq!(shown[0]["date"], days[0].0.as_str(), "{body}");
    // Asked for by `from` alone, the continued day is no "to before from".
    let (status, body) = {
        let r = t.get(&format!("/account/statistics?from={}", days[0].0), &alice);
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dates"].as_array().unwrap().len(), 1, "{body}");
    let r = t.get("/account/report", &alice);
    assert_eq!(r.status(), 200);
    let disposition = header(&r, "content-disposition").unwrap().to_string();
    assert!(
        disposition.contains(&days[0].0.replace('-', "")),
        "{disposition} ends before {}",
        days[0].0
    );

    // Statistics keep each local day apart.
    set_timezone(&t, &bob, "bob", 12);
    let days = statistics(&t, &bob, "UNIVERSAL", "PLAN");
    assert_eq!(days.len(), 2, "{days:?}");
    assert_eq!((days[0].1, days[1].1), (10, 10), "{days:?}");
    let d0 = chrono::NaiveDate::parse_from_str(&days[0].0, "%Y-%m-%d").unwrap();
    let d1 = chrono::NaiveDate::parse_from_str(&days[1].0, "%Y-%m-%d").unwrap();
    assert_eq!(d1 - d0, chrono::Duration::days(1), "{days:?}");
    let matrix_days = statistics(&t, &bob, "ROUTING", "MATRIX");
    assert_eq!(
        matrix_days.iter().map(|(_, p)| p).collect::<Vec<_>>(),
        vec![&10, &5],
        "{matrix_days:?}"
    );
}

/// `bytes` as a request body: chunked (reqwest knows no length of a reader), or with its length.
fn body_of(bytes: &[u8], chunked: bool) -> reqwest::blocking::Body {
    if chunked {
        reqwest::blocking::Body::new(std::io::Cursor::new(bytes.to_vec()))
    } else {
        reqwest::blocking::Body::from(bytes.to_vec())
    }
}

fn assert_names_offset(err: &Value, offset: usize) {
    let message = err["message"].as_str().unwrap();
    assert!(message.contains(&format!("byte {offset}")), "{err}");
}

#[test]
fn invalid_json_where_points_count_is_400_and_never_forwarded() {
    let t = Tollgate::start_extra(&quota_table(
        "UNIVERSAL",
        "PLAN",
        "",
        "points_per_day = 100",
    ));
    let alice = t.token("alice");
    let cases: [&[u8]; 4] = [
        br#"{"locations": [{"key": 1}, {"key": 2},]}"#,
        br#"{"locations": [1, 2]} trailing"#,
        br#"{"locations": [1, 2"#,
        b"not json at all",
    ];
    for body in cases {
        let r = client()
            .post(t.url(PLAN))
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{}", String::from_utf8_lossy(body));
        let err: Value = r.json().unwrap();
        assert_error_shape(&err, "UNIVERSAL");
        let message = err["message"].as_str().unwrap();
        assert!(message.starts_with("body"), "{message}");
        assert!(message.contains("byte "), "no byte offset in {message}");
    }
    // The offset points at the fault: the ']' after the trailing comma.
    let body = br#"{"locations": [1, 2,]}"#;
    let r = client()
        .post(t.url(PLAN))
        .bearer_auth(&alice)
        .body(body.to_vec())
        .send()
        .unwrap();
    let offset = body.iter().position(|&b| b == b']').unwrap();
    assert_names_offset(&r.json().unwrap(), offset);
    // A large body (counted in many feeds as it arrives) broken deep inside.
    let pad = "p".repeat(4000);
    let mut big = serde_json::to_vec(&json!({
        "locations": (0..800).map(|i| json!({"key": i, "pad": pad})).collect::<Vec<_>>()
    }))
    .unwrap();
    let offset = big.len() * 2 / 3;
    let offset = offset + big[offset..].iter().position(|&b| b == b',').unwrap();
    big[offset] = b';';
    for chunked in [false, true] {
        let r = client()
            .post(t.url(PLAN))
            .bearer_auth(&alice)
            .body(body_of(&big, chunked))
            .send()
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_names_offset(&r.json().unwrap(), offset);
    }
    assert_eq!(
        demo_requests(&t, PLAN),
        0,
        "an invalid body reached the upstream"
    );
    assert_eq!(statistics_total(&t, &alice, "UNIVERSAL", "PLAN"), 0);

    // A route that counts no points forwards any body, byte-exact.
    let raw = b"not json, \xff\x00 and that is fine".to_vec();
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("content-type", "application/octet-stream")
        .body(raw.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().to_vec(), raw);
}

fn quota_of(t: &Tollgate, token: &str, service: &str, group: &str) -> Value {
    let r = t.get("/account/quota", token);
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    body["base"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == service)
        .and_then(|s| {
            s["methods"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["method_group"] == group)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no {service}/{group} in {body}"))
}

#[test]
fn company_and_user_overrides_apply_and_set_quota_changes_them_after_restart() {
    let mut extra = quota_table(
        "UNIVERSAL",
        "PLAN",
        "",
        "points_per_request = 100\npoints_per_day = 1000\nmax_concurrent_execution = 5",
    );
    extra.push_str(&quota_table(
        "UNIVERSAL",
        "PLAN",
        "company = \"acme\"",
        "points_per_day = 5000",
    ));
    extra.push_str(&quota_table(
        "UNIVERSAL",
        "PLAN",
        "user = \"alice\"",
        "points_per_request = 50\nmax_concurrent_execution = 1\npoints_per_date_window = 20000\ndate_window_days = 3",
    ));
    extra.push_str(&quota_table(
        "UNIVERSAL",
        "PLAN",
        "company = \"evil_corp\"",
        "points_per_day = 10",
    ));
    let mut t = Tollgate::start_extra(&extra);
    let (alice, bob, mallory) = (t.token("alice"), t.token("bob"), t.token("mallory"));

    let q = quota_of(&t, &alice, "UNIVERSAL", "PLAN");
    assert_eq!(
        (
            &q["points_per_request"],
            &q["points_per_day"],
            &q["max_concurrent_execution"],
            &q["points_per_date_window"]
        ),
        (&json!(50), &json!(5000), &json!(1), &json!(20000)),
        "alice: {q}"
    );
    let q = quota_of(&t, &bob, "UNIVERSAL", "PLAN");
    assert_eq!(
        (
            &q["points_per_request"],
            &q["points_per_day"],
            &q["max_concurrent_execution"]
        ),
        (&json!(100), &json!(5000), &json!(5)),
        "bob: {q}"
    );
    assert!(
        q.get("points_per_date_window").is_none(),
        "bob has no window: {q}"
    );
    let q = quota_of(&t, &mallory, "UNIVERSAL", "PLAN");
    assert_eq!(
        (
            &q["points_per_request"],
            &q["points_per_day"],
            &q["max_concurrent_execution"]
        ),
        (&json!(100), &json!(10), &json!(5)),
        "mallory: {q}"
    );

    // And they are what admission enforces.
    assert_eq!(call_plan(&t, &alice, 51, &[]).status(), 402);
    assert_eq!(call_plan(&t, &bob, 51, &[]).status(), 200);
    assert_eq!(call_plan(&t, &mallory, 11, &[]).status(), 402);
    assert_eq!(call_plan(&t, &mallory, 10, &[]).status(), 200);
    std::thread::scope(|s| {
        let held = s.spawn(|| call_plan(&t, &alice, 1, &[("x-demo-delay-ms", "1500")]).status());
        assert!(eventually(Duration::from_secs(5), || t.demo_stats()
            ["in_flight"]
            == 1));
        assert_eq!(
            call_plan(&t, &alice, 1, &[]).status(),
            429,
            "alice's one slot was exceeded"
        );
        assert_eq!(
            call_plan(&t, &bob, 1, &[]).status(),
            200,
            "bob's slots are his own"
        );
        assert_eq!(held.join().unwrap(), 200);
    });

    // The CLI, with the server stopped, overrides one value and the rest stays inherited.
    assert_eq!(t.terminate(), Some(0));
    let out = t.user_cli(
        &[
            "set-quota",
            "alice",
            "--service",
            "UNIVERSAL",
            "--method-group",
            "PLAN",
            "--points-per-day",
            "7",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.spawn();
    let (alice, bob) = (t.token("alice"), t.token("bob"));
    let q = quota_of(&t, &alice, "UNIVERSAL", "PLAN");
    assert_eq!(
        (
            &q["points_per_request"],
            &q["points_per_day"],
            &q["max_concurrent_execution"]
        ),
        (&json!(50), &json!(7), &json!(1)),
        "alice after set-quota: {q}"
    );
    assert_eq!(
        quota_of(&t, &bob, "UNIVERSAL", "PLAN")["points_per_day"],
        5000
    );
    // Alice spent 1 point before: 7 - 1 = 6 left.
    assert_eq!(call_plan(&t, &alice, 7, &[]).status(), 402);
    assert_eq!(call_plan(&t, &alice, 6, &[]).status(), 200);
    assert_eq!(call_plan(&t, &alice, 1, &[]).status(), 402);
}

#[test]
fn the_upstream_gets_the_counted_points_and_caller_copies_are_dropped() {
    let extra = r#"
[[routes]]
method = "POST"
path = "/demo/echo"
upstream = "demo"
service = "UNIVERSAL"
method_group = "CONVERT"
operation = "echo_counted"
points = ["/locations", "/orders"]
unique_key = "/key"

[[quotas]]
service = "UNIVERSAL"
method_group = "CONVERT"
points_per_day = 10000
"#;
    let t = Tollgate::start_with(Setup {
        extra: extra.to_string(),
        with_default_routes: false,
        ..Setup::default()
    });
    let alice = t.token("alice");
    // 5 elements; by key a, b, c: 3 unique. A missing key compares the whole element.
    let body = json!({
        "locations": [{"key": "a"}, {"key": "b"}, {"key": "a", "note": "same key"}],
        "orders": [{"key": "b", "x": 1}, {"key": "c"}],
        "other": [1, 2, 3]
    });
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("x-points", "999")
        .header("x-unique-points", "0")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ratelimit_headers(&r, 10000, Some(9995));
    let seen: Value = serde_json::from_str(header(&r, "x-demo-seen-headers").unwrap()).unwrap();
    assert_eq!(seen["x-points"], "5", "{seen}");
    assert_eq!(seen["x-unique-points"], "3", "{seen}");
    assert_eq!(seen["x-client"], "acme_|_alice", "{seen}");
    assert!(seen.get("authorization").is_none(), "{seen}");
    // Echoed unchanged.
    assert_eq!(r.json::<Value>().unwrap(), body);

    let stats = t
        .get("/account/statistics", &alice)
        .json::<Value>()
        .unwrap();
    let methods = &stats["dates"][0]["services"][0]["methods"][0];
    assert_eq!(
        (
            &methods["points_per_day"],
            &methods["unique_points_per_day"]
        ),
        (&json!(5), &json!(3)),
        "{stats}"
    );

    // A body read in many pieces is counted whole and forwarded byte-exact (~370 KB, and
    // ~3.7 MB, counted in many feeds as it arrives); chunked, and with its length announced.
    let pad = "p".repeat(4000);
    for (n, chunked) in [(90, true), (900, true), (900, false)] {
        let big = serde_json::to_vec(&json!({
            "locations": (0..n).map(|i| json!({"key": i % 30, "pad": pad})).collect::<Vec<_>>()
        }))
        .unwrap();
        let r = client()
            .post(t.url("/demo/echo"))
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .body(body_of(&big, chunked))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen: Value = serde_json::from_str(header(&r, "x-demo-seen-headers").unwrap()).unwrap();
        assert_eq!(seen["x-points"], n.to_string(), "{seen}");
        assert_eq!(seen["x-unique-points"], "30", "{seen}");
        assert_eq!(seen["content-length"], big.len().to_string(), "{seen}");
        assert!(r.bytes().unwrap()[..] == big[..], "echoed unchanged");
    }
}
