//! The proxy core against the real binary: routing, tracecodes and identity headers, timing,
//! bodies (large, chunked, 100-continue, too large), upstream failures, the system endpoints,
//! metrics, graceful shutdown and `check-config`.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::blocking::Response;

// ---------------------------------------------------------------------------------------------
// Helpers

fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// The X-Tracecode of an answer, checked to be a UUID v4.
fn tracecode(r: &Response) -> String {
    let code = header(r, "x-tracecode")
        .unwrap_or_else(|| panic!("no X-Tracecode on {} {}", r.status(), r.url()));
    let uuid =
        uuid::Uuid::parse_str(&code).unwrap_or_else(|_| panic!("X-Tracecode {code} is not a UUID"));
    assert_eq!(
        uuid.get_version_num(),
        4,
        "X-Tracecode {code} is not a v4 UUID"
    );
    code
}

/// (proxy ms, upstream ms) from `Server-Timing: proxy;dur=X, upstream;dur=Y`.
fn server_timing(r: &Response) -> (f64, f64) {
    let v = header(r, "server-timing").unwrap_or_else(|| panic!("no Server-Timing on {}", r.url()));
    let dur = |name: &str| -> f64 {
        v.split(',')
            .map(str::trim)
            .find_map(|part| part.strip_prefix(name)?.strip_prefix(";dur="))
            .unwrap_or_else(|| panic!("Server-Timing {v:?} has no {name};dur="))
            .parse()
            .unwrap_or_else(|_| panic!("Server-Timing {v:?}: {name} duration is not a number"))
    };
    let (p, u) = (dur("proxy"), dur("upstream"));
    // The upstream's own entries are kept, before Tollgate's (the demo reports its time).
    let demo_path =
        r.url().path().starts_with("/demo/") || r.url().path().starts_with("/universal/");
    if demo_path && r.status().is_success() {
        assert!(v.starts_with("compute;dur="), "{v}");
    }
    assert!(p >= 0.0 && u >= 0.0, "{v}");
    (p, u)
}

/// The request headers the demo upstream saw, from /demo/echo's answer.
fn seen_headers(r: &Response) -> Value {
    serde_json::from_str(
        &header(r, "x-demo-seen-headers").expect("echo answers carry x-demo-seen-headers"),
    )
    .unwrap()
}

/// `x-demo-seen-headers` of an echo answer read with [`Raw`].
fn seen_headers_raw(headers: &[(String, String)]) -> Value {
    let seen = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-demo-seen-headers"))
        .expect("echo answers carry x-demo-seen-headers");
    serde_json::from_str(&seen.1).unwrap()
}

/// The whole answer to `request` on a new connection, as text.
fn raw_text(port: u16, request: &str) -> String {
    let answer = raw_exchange(port, request.as_bytes(), Duration::from_secs(5));
    String::from_utf8_lossy(&answer).into_owned()
}

fn json_body(r: Response) -> Value {
    let text = r.text().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("body is not JSON: {text:?}"))
}

fn assert_404_shape(r: Response, resource: &str, service: &str) {
    assert_eq!(r.status(), 404);
    tracecode(&r);
    let body = json_body(r);
    assert_eq!(body["resource_id"], resource, "{body}");
    assert!(body["detail"]["tracedata"].is_object(), "{body}");
    assert_error_shape(&body, service);
}

/// Deterministic pseudo-random bytes (so a byte shift cannot go unnoticed).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn demo_count(t: &Tollgate, path: &str) -> u64 {
    t.demo_stats()["requests"][path].as_u64().unwrap_or(0)
}

/// A minimal HTTP/1.1 keep-alive client over one socket, for what reqwest hides
/// (100 Continue) and for latency figures without client overhead.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match self.s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// One response head (1xx included); None on close or timeout.
    fn read_head(&mut self) -> Option<(u16, Vec<(String, String)>)> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !self.fill() {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Some((status, headers))
    }

    /// The next final response with its whole body; None on close or timeout.
    fn read_response(&mut self) -> Option<RawResponse> {
        let (status, headers) = loop {
            let (status, headers) = self.read_head()?;
            if status >= 200 {
                break (status, headers);
            }
        };
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let body = if let Some(len) = get("content-length") {
            let len: usize = len.parse().ok()?;
            while self.buf.len() < len {
                if !self.fill() {
                    return None;
                }
            }
            self.buf.drain(..len).collect()
        } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if !self.fill() {
                        return None;
                    }
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&self.buf[..line_end])
                        .split(';')
                        .next()?
                        .trim(),
                    16,
                )
                .ok()?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if !self.fill() {
                        return None;
                    }
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break body;
                }
            }
        } else {
            while self.fill() {}
            std::mem::take(&mut self.buf)
        };
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

#[test]
fn every_route_answers_through_the_demo_upstream() {
    let t = Tollgate::start();
    let alice = t.token("alice");

    let plan = t.post_json(
        "/universal/plan/calculation",
        &alice,
        &json!({"locations": [{"key": 1}, {"key": 2}], "orders": [{}]}),
    );
    assert_eq!(plan.status(), 200);
    let code = tracecode(&plan);
    server_timing(&plan);
    let body = json_body(plan);
    assert_eq!(body["result"]["locations"], 2, "{body}");
    assert_eq!(body["result"]["orders"], 1, "{body}");
    assert_eq!(
        body["tracedata"]["code"], code,
        "the upstream worked under the same tracecode: {body}"
    );

    let matrix = t.post_json(
        "/routing/matrix/calculation",
        &alice,
        &json!({"waypoints": [1, 2, 3]}),
    );
    assert_eq!(matrix.status(), 200);
    tracecode(&matrix);
    server_timing(&matrix);
    let body = json_body(matrix);
    assert_eq!(
        body["matrix"]["distances"].as_array().unwrap().len(),
        3,
        "{body}"
    );
    assert_eq!(body["matrix"]["distances"][0][2], 2000, "{body}");

    let echo = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body("ping")
        .send()
        .unwrap();
    assert_eq!(echo.status(), 200);
    tracecode(&echo);
    server_timing(&echo);
    assert_eq!(echo.text().unwrap(), "ping");

    // An open route: no token needed.
    let version = client()
        .get(t.url("/universal/system/version"))
        .send()
        .unwrap();
    assert_eq!(version.status(), 200);
    tracecode(&version);
    server_timing(&version);
    assert_eq!(
        json_body(version),
        json!({"major": 6, "minor": 20, "build": "demo"})
    );

    for path in [
        "/universal/plan/calculation",
        "/routing/matrix/calculation",
        "/demo/echo",
        "/universal/system/version",
    ] {
        assert_eq!(
            demo_count(&t, path),
            1,
            "{path} should have reached the upstream once: {}",
            t.demo_stats()
        );
    }

    // No route: 404 in the API's 404 shape, nothing reaches the upstream.
    assert_404_shape(
        t.get("/universal/nothing/here", &alice),
        "/universal/nothing/here",
        "UNIVERSAL",
    );
    assert_404_shape(
        client().get(t.url("/routing/nowhere")).send().unwrap(),
        "/routing/nowhere",
        "ROUTING",
    );
    let r = client()
        .post(t.url("/universal/plan/calculation/extra"))
        .bearer_auth(&alice)
        .json(&json!({}))
        .send()
        .unwrap();
    assert_404_shape(r, "/universal/plan/calculation/extra", "UNIVERSAL");
    // A known path with a method no route takes: 404 as well.
    assert_404_shape(
        t.get("/universal/plan/calculation", &alice),
        "/universal/plan/calculation",
        "UNIVERSAL",
    );
    let r = client()
        .delete(t.url("/universal/system/version"))
        .send()
        .unwrap();
    assert_404_shape(r, "/universal/system/version", "UNIVERSAL");
    let r = client()
        .put(t.url("/routing/matrix/calculation"))
        .bearer_auth(&alice)
        .json(&json!({"waypoints": []}))
        .send()
        .unwrap();
    assert_404_shape(r, "/routing/matrix/calculation", "ROUTING");

    let stats = t.demo_stats();
    assert_eq!(
        stats["requests"].as_object().unwrap().len(),
        4,
        "no 404 may reach the upstream: {stats}"
    );
    for path in [
        "/universal/plan/calculation",
        "/routing/matrix/calculation",
        "/universal/system/version",
    ] {
        assert_eq!(demo_count(&t, path), 1, "{path}: {stats}");
    }
}

#[test]
fn an_async_process_keeps_one_tracecode_from_start_to_result() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let started = t.post_json(
        "/universal/plan/calculation_async",
        &alice,
        &json!({"locations": [{"key": "a"}]}),
    );
    assert_eq!(started.status(), 202);
    let code = tracecode(&started);
    let body = json_body(started);
    assert_eq!(
        body["tracedata"]["code"], code,
        "the upstream started the process under Tollgate's code: {body}"
    );

    let state = t.get(&format!("/universal/plan/calculation_async/{code}"), &alice);
    assert_eq!(state.status(), 200);
    assert_eq!(tracecode(&state), code);
    server_timing(&state);
    assert_eq!(json_body(state)["tracedata"]["code"], code);

    // The result: 202 while computing (300 ms), then 200 with the result.
    let deadline = Instant::now() + Duration::from_secs(10);
    let result = loop {
        let r = t.get(&format!("/universal/plan/result/{code}"), &alice);
        assert_eq!(tracecode(&r), code);
        assert!(r.status() == 200 || r.status() == 202, "{}", r.status());
        if r.status() == 200 {
            break json_body(r);
        }
        assert!(Instant::now() < deadline, "the process never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(result["result"]["locations"], 1, "{result}");
    assert_eq!(result["tracedata"]["code"], code, "{result}");

    // Another user may not touch it, and the upstream never hears of the attempt.
    let before = demo_count(&t, &format!("/universal/plan/calculation_async/{code}"));
    let bob = t.token("bob");
    assert_404_shape(
        t.get(&format!("/universal/plan/calculation_async/{code}"), &bob),
        &code,
        "UNIVERSAL",
    );
    assert_eq!(
        demo_count(&t, &format!("/universal/plan/calculation_async/{code}")),
        before
    );

    let cancelled = client()
        .delete(t.url(&format!("/universal/plan/calculation_async/{code}")))
        .bearer_auth(&alice)
        .send()
        .unwrap();
    assert_eq!(cancelled.status(), 204);
    assert_eq!(tracecode(&cancelled), code);
    assert_eq!(
        demo_count(&t, &format!("/universal/plan/calculation_async/{code}")),
        before + 1
    );

    // A process id that is not a tracecode is a 404 before the upstream.
    assert_eq!(
        t.get("/universal/plan/result/not-a-uuid", &alice).status(),
        404
    );
    assert_eq!(demo_count(&t, "/universal/plan/result/not-a-uuid"), 0);
}

// ---------------------------------------------------------------------------------------------
// Tracecode and identity headers

#[test]
fn the_upstream_sees_tollgates_identity_headers_never_the_callers() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let forged = "00000000-0000-4000-8000-000000000000";
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("X-Tracecode", forged)
        .header("X-Client", "evil_corp_|_mallory")
        .header("X-Points", "999999")
        .header("X-Unique-Points", "999999")
        .header("Proxy-Authorization", "Basic bWFsbG9yeTpzZWNyZXQ=")
        .header("X-Custom", "kept")
        .header("X_Client", "evil_corp_|_mallory")
        .header("x_tracecode", forged)
        .header("Transfer_Encoding", "chunked")
        .header("X_Kept_Too", "kept")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let code = tracecode(&r);
    assert_ne!(code, forged, "a caller may not choose its tracecode");
    let seen = seen_headers(&r);
    assert_eq!(seen["x-tracecode"], code.as_str(), "{seen}");
    assert_eq!(seen["x-client"], "acme_|_alice", "{seen}");
    assert_eq!(seen["x-points"], "0", "{seen}");
    assert_eq!(seen["x-unique-points"], "0", "{seen}");
    assert_eq!(seen["x-custom"], "kept", "other headers pass: {seen}");
    assert_eq!(
        seen["x_kept_too"], "kept",
        "other names with '_' pass: {seen}"
    );
    for spoof in ["x_client", "x_tracecode", "transfer_encoding"] {
        assert!(
            seen.get(spoof).is_none(),
            "{spoof} reached the upstream: {seen}"
        );
    }
    assert!(
        seen.get("authorization").is_none() && seen.get("proxy-authorization").is_none(),
        "the caller's credentials reached the upstream: {seen}"
    );
    assert!(!seen.to_string().contains(&alice), "{seen}");
    assert!(
        !seen.to_string().contains(forged)
            && !seen.to_string().contains("mallory")
            && !seen.to_string().contains("999999"),
        "{seen}"
    );

    // Each call gets its own tracecode.
    let again = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body("{}")
        .send()
        .unwrap();
    let code2 = tracecode(&again);
    assert_ne!(code2, code);
    assert_eq!(seen_headers(&again)["x-tracecode"], code2.as_str());

    // An open route's call is anonymous to the upstream, still with a tracecode, no token passed.
    let r = client()
        .get(t.url("/universal/system/version"))
        .bearer_auth(&alice)
        .header("X-Client", "acme_|_bob")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    tracecode(&r);
}

#[test]
fn server_timing_splits_proxy_and_upstream_time() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body("x")
        .send()
        .unwrap();
    let (proxy, upstream) = server_timing(&r);
    assert!(
        proxy < 100.0 && upstream < 100.0,
        "an instant echo: proxy {proxy} ms, upstream {upstream} ms"
    );

    let started = Instant::now();
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("x-demo-delay-ms", "200")
        .body("x")
        .send()
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(r.status(), 200);
    let (proxy, upstream) = server_timing(&r);
    assert!(
        upstream >= 200.0,
        "upstream;dur={upstream} for a 200 ms upstream"
    );
    assert!(
        upstream <= elapsed.as_secs_f64() * 1000.0 + 1.0,
        "upstream;dur={upstream} is longer than the call ({elapsed:?})"
    );
    assert!(
        proxy < 50.0,
        "proxy;dur={proxy} ms should not include the upstream's 200 ms"
    );

    // Open routes and follow-ups carry it too.
    let r = client()
        .get(t.url("/universal/system/version"))
        .send()
        .unwrap();
    server_timing(&r);
}

// ---------------------------------------------------------------------------------------------
// Bodies

#[test]
fn five_megabyte_bodies_pass_byte_exact_with_length_or_chunked() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let data = noise(5 << 20);

    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(seen_headers(&r)["content-length"], (5 << 20).to_string());
    let back = r.bytes().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(
        back[..] == data[..],
        "the Content-Length body came back altered"
    );

    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(data.clone()));
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("content-type", "application/octet-stream")
        .body(chunked)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = seen_headers(&r);
    assert_eq!(
        seen["content-length"],
        (5 << 20).to_string(),
        "the buffered body goes upstream with its length: {seen}"
    );
    assert!(seen.get("transfer-encoding").is_none(), "{seen}");
    let back = r.bytes().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back[..] == data[..], "the chunked body came back altered");

    // A body in more pieces than one writev takes (IOV_MAX, 1024): 3000
    // one-byte chunks.
    let small = noise(3000);
    let mut c = Raw::connect(t.port);
    let mut request = format!(
        "POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for byte in &small {
        request.extend_from_slice(b"1\r\n");
        request.push(*byte);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    c.send(&request);
    let r = c
        .read_response()
        .expect("no answer to the many-chunked body");
    assert_eq!(r.status, 200);
    assert!(r.body == small, "the many-chunked body came back altered");

    assert_eq!(t.demo_stats()["bodies_bytes"], 2 * (5 << 20) + 3000);
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let body = noise(200_000);
    let mut c = Raw::connect(t.port);
    c.send(
        format!(
            "POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let (status, _) = c
        .read_head()
        .expect("no interim answer within 5 s of a request with Expect: 100-continue");
    assert_eq!(status, 100, "expected 100 Continue before the body");
    c.send(&body);
    let r = c.read_response().expect("no answer after the body");
    assert_eq!(r.status, 200);
    assert!(
        r.body == body,
        "the body came back altered ({} bytes)",
        r.body.len()
    );
    let seen: Value = serde_json::from_str(r.header("x-demo-seen-headers").unwrap()).unwrap();
    assert!(seen.get("expect").is_none(), "Expect is hop-by-hop: {seen}");
    // A fresh exchange on a new connection still works.
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body("ok")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn expect_100_continue_keeps_the_connection_alive() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let mut c = Raw::connect(t.port);
    c.send(format!("POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n").as_bytes());
    assert_eq!(c.read_head().map(|h| h.0), Some(100));
    c.send(b"abc");
    let r = c.read_response().expect("no answer after the body");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
    assert_eq!(r.header("connection"), Some("keep-alive"));
    c.send(format!("POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Length: 2\r\n\r\nok").as_bytes());
    let r = c
        .read_response()
        .expect("the connection broke after 100-continue");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let plan = r#"{"locations":[{"key":"a"},{"key":"b"},{"key":"a"}]}"#;
    // Five requests in one write, before any answer is read: a GET without a token, a POST
    // with a length, a counted POST, a chunked POST and an account API call.
    let mut wire =
        String::from("GET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n");
    wire += &format!(
        "POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Length: 5\r\n\r\nfirst"
    );
    wire += &format!(
        "POST /universal/plan/calculation HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{plan}",
        plan.len()
    );
    wire += &format!(
        "POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nsec\r\n3\r\nond\r\n0\r\n\r\n"
    );
    wire += &format!(
        "GET /account/quota HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\n\r\n"
    );
    let mut c = Raw::connect(t.port);
    c.send(wire.as_bytes());
    let mut answers = Vec::new();
    for i in 0..5 {
        let r = c
            .read_response()
            .unwrap_or_else(|| panic!("pipelined request {i} was never answered"));
        answers.push(r);
    }
    let codes: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(codes, [200; 5], "every pipelined request answered");
    assert!(
        String::from_utf8_lossy(&answers[0].body).contains("major"),
        "the version answer comes first"
    );
    assert_eq!(answers[1].body, b"first");
    let plan_answer: Value = serde_json::from_slice(&answers[2].body).unwrap();
    assert_eq!(plan_answer["result"]["locations"], 3, "{plan_answer}");
    assert_eq!(answers[3].body, b"second");
    let quota: Value = serde_json::from_slice(&answers[4].body).unwrap();
    assert!(quota.is_object() || quota.is_array(), "{quota}");
    // Each call is its own exchange, with its own tracecode.
    let codes: std::collections::HashSet<&str> = answers[..4]
        .iter()
        .map(|r| {
            r.header("x-tracecode")
                .expect("a tracecode on every proxied answer")
        })
        .collect();
    assert_eq!(codes.len(), 4);
    let seen = t.demo_stats();
    assert_eq!(seen["bodies_bytes"], 5 + plan.len() as u64 + 6, "{seen}");
    // A rejected call closes the connection: its unread body is never taken for a request.
    c.send(b"POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 32\r\n\r\nGET /smuggled HTTP/1.1\r\nX: y\r\n\r\nGET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let rejected = c
        .read_response()
        .expect("the call without a token is answered");
    assert_eq!(rejected.status, 401);
    assert_eq!(rejected.header("connection"), Some("close"));
    assert!(
        c.read_response().is_none(),
        "nothing answered after the close"
    );
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout_seconds() {
    let t = Tollgate::start_with(Setup {
        server: "keepalive_timeout_seconds = 1".into(),
        ..Setup::default()
    });
    let get = b"GET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut c = Raw::connect(t.port);
    c.send(get);
    assert_eq!(c.read_response().map(|r| r.status), Some(200));
    // Within the timeout the connection serves the next request...
    std::thread::sleep(Duration::from_millis(300));
    c.send(get);
    let r = c
        .read_response()
        .expect("a second answer on the kept connection");
    assert_eq!(
        (r.status, r.header("connection")),
        (200, Some("keep-alive"))
    );
    // ...and idle past it, the server closes it.
    let idle = Instant::now();
    assert!(!c.fill(), "the idle connection was closed, not left open");
    assert!(
        idle.elapsed() >= Duration::from_millis(800) && idle.elapsed() < Duration::from_secs(4),
        "closed after about a second: {:?}",
        idle.elapsed()
    );
}

#[test]
fn a_request_head_trickled_in_is_cut_off_at_keepalive_timeout_seconds() {
    let t = Tollgate::start_with(Setup {
        server: "keepalive_timeout_seconds = 1".into(),
        ..Setup::default()
    });
    // The metrics port as well: a few hundred such connections held it, and the process's
    // file descriptors, for good.
    for (port, path) in [
        (t.port, "/universal/system/version"),
        (t.metrics_port, "/metrics"),
    ] {
        trickled_head_is_cut_off(port, path);
    }
    // A head the metrics port cannot read is answered, and not written to the log.
    let long = "x".repeat(100_000);
    let mut c = Raw::connect(t.metrics_port);
    c.send(format!("GET /{long} HTTP/1.1\r\nHost: m\r\n\r\n").as_bytes());
    let got = c.read_response().expect("an answer to an unreadable head");
    assert_eq!(got.status, 400);
    assert!(!t.log().contains(&long[..1000]), "the head went to the log");
}

fn trickled_head_is_cut_off(port: u16, path: &str) {
    let mut c = Raw::connect(port);
    c.s.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let started = Instant::now();
    c.send(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").as_bytes());
    // A byte every 250 ms: each read comes quickly, the head never ends.
    let closed = loop {
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
        if c.s.write_all(b"a").is_err() {
            break true;
        }
        let mut byte = [0u8; 1];
        match c.s.read(&mut byte) {
            Ok(0) => break true,
            Ok(_) => panic!("an answer to a head that never ended"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break true,
        }
    };
    assert!(
        closed,
        "{port}: the trickled head held the connection for 5 s"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{port}: {:?}",
        started.elapsed()
    );
}

#[test]
fn an_unreadable_head_connect_and_a_missing_host_get_errors_in_the_api_shape() {
    let t = Tollgate::start();
    let many_fields: Vec<u8> = [
        &b"GET /universal/system/version HTTP/1.1\r\nHost: a\r\n"[..],
        &(0..300)
            .flat_map(|i| format!("X-{i}: y\r\n").into_bytes())
            .collect::<Vec<u8>>(),
        b"\r\n",
    ]
    .concat();
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000));
    for (wire, status, message) in [
        (
            &b"GARBAGE / HTTP/1.1\r\nHost x\r\n\r\n"[..],
            400,
            "request: not a valid HTTP/1.1 request head",
        ),
        // Why a head could not be read, where it is known.
        (
            &many_fields,
            431,
            "request head: more than 256 header fields",
        ),
        (
            long_target.as_bytes(),
            414,
            "request target: longer than 65534 bytes",
        ),
        (
            b"GET /universal/system/version HTTP/1.2\r\nHost: a\r\n\r\n",
            505,
            "request: only HTTP/1.0 and HTTP/1.1 are served",
        ),
        (
            b"GET /universal/system/version http/1.1\r\nHost: a\r\n\r\n",
            400,
            "request: not a valid HTTP/1.1 request head",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n",
            400,
            "request: not a valid HTTP/1.1 request head",
        ),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            405,
            "method: CONNECT is not served",
        ),
        (
            b"GET /universal/system/version HTTP/1.1\r\nAccept: */*\r\n\r\n",
            400,
            "Host: an HTTP/1.1 request must carry one",
        ),
        (
            b"GET /universal/system/version HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
            "request: not a valid HTTP/1.1 request head",
        ),
        (
            b"GET /account/info HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer x\r\nAuthorization: Bearer y\r\n\r\n",
            400,
            "Authorization: must be sent once",
        ),
        // Targets in no form a GET may use: not served as "/".
        (
            b"GET zz/echo HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "request target: must be a path starting with '/' or an absolute http URI",
        ),
        (
            b"GET ?x=1 HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "request target: must be a path starting with '/' or an absolute http URI",
        ),
        (
            b"GET mailto:a@b HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "request target: must be a path starting with '/' or an absolute http URI",
        ),
        (
            b"TRACE /universal/system/version HTTP/1.1\r\nHost: a\r\nCookie: c=1\r\n\r\n",
            405,
            "method: TRACE is not served",
        ),
        (
            b"TRACE /account/info HTTP/1.1\r\nHost: a\r\n\r\n",
            405,
            "method: TRACE is not served",
        ),
    ] {
        let mut c = Raw::connect(t.port);
        c.send(wire);
        let r = c
            .read_response()
            .unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(wire)));
        assert_eq!(r.status, status);
        assert_eq!(r.header("connection"), Some("close"));
        if status == 405 {
            // RFC 9110 15.5.6: a 405 says what is served there (at an authority, nothing).
            let served = if wire.starts_with(b"TRACE /account/") {
                "GET, HEAD, PUT"
            } else if wire.starts_with(b"TRACE") {
                "GET, HEAD"
            } else {
                ""
            };
            assert_eq!(r.header("allow"), Some(served));
        }
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["message"], message, "{body}");
        let code = body["tracedata"]["code"].as_str().unwrap().to_string();
        assert_eq!(r.header("x-tracecode"), Some(code.as_str()));
        assert_eq!(body["tracedata"]["client"], "anonymous");
        assert!(
            c.read_response().is_none(),
            "the connection is closed after it"
        );
    }
    // Each refusal is counted, by reason.
    let metrics = t.metrics();
    for (reason, count) in [
        ("unreadable_request_head", 7),
        ("connect", 1),
        ("trace", 2),
        ("bad_request_head", 5),
    ] {
        let line = format!("tollgate_rejections_total{{reason=\"{reason}\"}} {count}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    // The server goes on serving.
    let r = client()
        .get(t.url("/universal/system/version"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn bodies_over_max_body_bytes_get_413_and_never_reach_the_upstream() {
    let t = Tollgate::start_extra("\n[limits]\nmax_body_bytes = 1000\n");
    let alice = t.token("alice");

    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body(vec![b'a'; 5000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    tracecode(&r);
    let body = json_body(r);
    assert_error_shape(&body, "UNIVERSAL");
    assert!(body["message"].as_str().unwrap().contains("1000"), "{body}");

    let chunked = reqwest::blocking::Body::new(std::io::Cursor::new(vec![b'b'; 5000]));
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body(chunked)
        .send()
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_error_shape(&json_body(r), "UNIVERSAL");

    // Over the limit by one byte, chunked in small pieces.
    let mut c = Raw::connect(t.port);
    c.send(format!("POST /demo/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes());
    for _ in 0..7 {
        c.send(format!("{:x}\r\n{}\r\n", 143, "c".repeat(143)).as_bytes());
    }
    c.send(b"0\r\n\r\n");
    let r = c
        .read_response()
        .expect("no answer to a 1001-byte chunked body");
    assert_eq!(r.status, 413);

    assert_eq!(
        demo_count(&t, "/demo/echo"),
        0,
        "a refused body reached the upstream"
    );

    // At the limit: served.
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body(vec![b'd'; 1000])
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), 1000);
    assert_eq!(demo_count(&t, "/demo/echo"), 1);
}

// ---------------------------------------------------------------------------------------------
// Upstream failures

fn fault_route(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "{name}"
address = "127.0.0.1:{port}"
connect_timeout_ms = 500

[[routes]]
method = "POST"
path = "/universal/{name}/calculation"
upstream = "{name}"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "{name}_calculation"
{extra}
"#
    )
}

/// A JSON error in the API shape (never pingora's default HTML page).
/// Asserts a failed upstream's answer; gives the time Server-Timing says was waited on it (ms).
fn assert_upstream_error(r: Response, status: u16) -> f64 {
    assert_eq!(r.status(), status);
    tracecode(&r);
    // Load testers see the proxy's and the upstream's share of failed calls too.
    let (_, upstream_ms) = server_timing(&r);
    assert!(
        header(&r, "content-type").is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers()
    );
    let body = json_body(r);
    assert_error_shape(&body, "UNIVERSAL");
    upstream_ms
}

#[test]
fn a_refused_upstream_is_a_502_in_the_api_shape() {
    let dead = free_port();
    let t = Tollgate::start_extra(&fault_route("dead", dead, ""));
    let alice = t.token("alice");
    let started = Instant::now();
    let r = t.post_json("/universal/dead/calculation", &alice, &json!({}));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused should fail fast: {:?}",
        started.elapsed()
    );
    assert_upstream_error(r, 502);
    // Still serving.
    assert_eq!(
        t.post_json("/universal/plan/calculation", &alice, &json!({}))
            .status(),
        200
    );
}

#[test]
fn a_hanging_upstream_is_a_504_after_the_route_timeout() {
    let hang = FaultUpstream::start(Fault::Hang);
    let t = Tollgate::start_extra(&fault_route("hang", hang.port, "total_timeout_ms = 500"));
    let alice = t.token("alice");
    let started = Instant::now();
    let r = t.post_json("/universal/hang/calculation", &alice, &json!({}));
    let elapsed = started.elapsed();
    let waited = assert_upstream_error(r, 504);
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed <= Duration::from_secs(2),
        "504 after {elapsed:?}, expected ~500 ms"
    );
    assert!(
        (450.0..2000.0).contains(&waited),
        "Server-Timing says {waited} ms waited on the upstream"
    );
    assert_eq!(
        t.post_json("/universal/plan/calculation", &alice, &json!({}))
            .status(),
        200
    );
}

#[test]
fn a_body_that_stops_coming_is_a_408_after_the_client_read_timeout() {
    let t = Tollgate::start_extra("[limits]\nclient_read_timeout_ms = 300\n");
    let alice = t.token("alice");
    for (path, auth) in [
        (
            "/universal/plan/calculation",
            format!("Authorization: Bearer {alice}\r\n"),
        ),
        ("/account/token/generation", String::new()),
    ] {
        let started = Instant::now();
        let mut c = Raw::connect(t.port);
        c.send(format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"a\"").as_bytes());
        let answer = c.read_response().expect("an answer, not a silent close");
        assert_eq!(answer.status, 408, "{path}");
        let body = String::from_utf8_lossy(&answer.body);
        assert!(body.contains("client_read_timeout_ms"), "{path}: {body}");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
            "{path}: answered after {elapsed:?} with a 300 ms read timeout"
        );
    }
    // A client that keeps sending is not cut off.
    assert_eq!(
        t.post_json(
            "/universal/plan/calculation",
            &alice,
            &json!({"locations": []})
        )
        .status(),
        200
    );
}

#[test]
fn a_204_with_a_length_in_its_head_reaches_the_caller_without_one() {
    let upstream = FaultUpstream::start(Fault::NoContentWithLength);
    let t = Tollgate::start_extra(&fault_route("empty", upstream.port, ""));
    let alice = t.token("alice");
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let r = quick
        .post(t.url("/universal/empty/calculation"))
        .bearer_auth(&alice)
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(
        r.headers().get("content-length").is_none(),
        "{:?}",
        r.headers()
    );
    assert_eq!(r.bytes().expect("the answer ends at its head").len(), 0);
}

#[test]
fn a_head_request_gets_the_upstreams_head_without_waiting_for_a_body() {
    let upstream = FaultUpstream::start(Fault::HeadOnly);
    // Each call on a new upstream connection: the fault upstream answers one request each.
    let route = fault_route("head", upstream.port, "")
        .replace("method = \"POST\"", "method = \"HEAD\"")
        .replace(
            "connect_timeout_ms = 500",
            "connect_timeout_ms = 500\nkeepalive = 0",
        );
    let t = Tollgate::start_extra(&route);
    let alice = t.token("alice");
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let started = Instant::now();
    // The second call rides the caller's same connection: it is answered only once the first
    // call is over, which it must be at its head, not after waiting out a body.
    for _ in 0..2 {
        let r = quick
            .head(t.url("/universal/head/calculation"))
            .bearer_auth(&alice)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-length").as_deref(), Some("5"));
        tracecode(&r);
        assert_eq!(r.bytes().unwrap().len(), 0);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once, not after a timeout: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_head_request_with_a_body_leaves_the_upstream_connection_in_step() {
    // The demo upstream reads a request's announced body whatever its method. A HEAD whose
    // body were announced upstream but not sent would leave it waiting (a 504), or, once it
    // answered, leave the pooled connection expecting bytes that the next call's head would
    // fill.
    let t = Tollgate::start_extra(
        r#"
[[routes]]
method = "HEAD"
path = "/demo/echo"
upstream = "demo"
service = "UNIVERSAL"
method_group = "CONVERT"
operation = "echo_head"
"#,
    );
    let alice = t.token("alice");
    let started = Instant::now();
    let mut c = Raw::connect(t.port);
    c.send(
        format!(
            "HEAD /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Length: 5\r\n\r\nhello"
        )
        .as_bytes(),
    );
    let (status, _) = c.read_head().expect("no answer to a HEAD with a body");
    assert!(status < 500, "the upstream answered the HEAD: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    for i in 0..3 {
        let body = format!("after-{i}");
        let r = client()
            .post(t.url("/demo/echo"))
            .bearer_auth(&alice)
            .body(body.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.text().unwrap(),
            body,
            "the next calls are answered in step"
        );
    }
}

#[test]
fn an_answer_the_upstream_ends_by_closing_reaches_the_caller_framed() {
    let upstream = FaultUpstream::start(Fault::CloseDelimited);
    let t = Tollgate::start_extra(&fault_route("closing", upstream.port, ""));
    let alice = t.token("alice");
    let mut c = Raw::connect(t.port);
    let request = format!(
        "POST /universal/closing/calculation HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    for round in 0..2 {
        c.send(request.as_bytes());
        let r = c
            .read_response()
            .unwrap_or_else(|| panic!("round {round}: no framed answer on a kept connection"));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"until the end");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    // An HTTP/1.0 caller cannot take chunks: it is answered in HTTP/1.1, and the close ends it.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(
        format!(
            "POST /universal/closing/calculation HTTP/1.0\r\nAuthorization: Bearer {alice}\r\nContent-Length: 2\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("keep-alive"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\nuntil the end"), "{answer}");
}

#[test]
fn a_chunked_answer_reaches_an_http_1_0_caller_unchunked() {
    let upstream = FaultUpstream::start(Fault::Chunked);
    // The fault upstream answers one request per connection.
    let t = Tollgate::start_extra(
        &fault_route("chunks", upstream.port, "")
            .replace(
                "connect_timeout_ms = 500",
                "connect_timeout_ms = 500\nkeepalive = 0",
            )
            .replace("method = \"POST\"", "method = \"*\""),
    );
    let alice = t.token("alice");
    let request = |version: &str| {
        format!(
            "POST /universal/chunks/calculation HTTP/{version}\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    // An HTTP/1.1 caller gets the chunks, and keeps its connection.
    let mut c = Raw::connect(t.port);
    c.send(request("1.1").as_bytes());
    let r = c.read_response().expect("a chunked answer");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello world"[..]));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    // An HTTP/1.0 caller gets the body itself, ended by the close.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(request("1.0").as_bytes()).unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{answer}"
    );
    assert_eq!(body, "hello world", "{answer}");
    // Nor is the head of its answer to HEAD chunked, kept alive or not.
    let mut c = Raw::connect(t.port);
    c.send(
        format!(
            "HEAD /universal/chunks/calculation HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer {alice}\r\n\r\n"
        )
        .as_bytes(),
    );
    let (status, headers) = c.read_head().expect("an answer to HEAD");
    assert_eq!(status, 200);
    assert!(
        !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding")),
        "{headers:?}"
    );
}

#[test]
fn an_upstream_closing_before_its_answer_is_a_502() {
    let close = FaultUpstream::start(Fault::CloseSilently);
    let t = Tollgate::start_extra(&fault_route("close", close.port, ""));
    let alice = t.token("alice");
    for _ in 0..2 {
        assert_upstream_error(
            t.post_json("/universal/close/calculation", &alice, &json!({})),
            502,
        );
    }
    assert_eq!(
        t.post_json("/universal/plan/calculation", &alice, &json!({}))
            .status(),
        200
    );
}

#[test]
fn an_upstream_reset_mid_answer_cuts_the_callers_answer_short() {
    let reset = FaultUpstream::start(Fault::ResetMidResponse);
    let t = Tollgate::start_extra(&fault_route("reset", reset.port, ""));
    let alice = t.token("alice");
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let r = quick
            .post(t.url("/universal/reset/calculation"))
            .bearer_auth(&alice)
            .json(&json!({}))
            .send();
        match r {
            // The head was relayed before the reset; the body must not look complete.
            Ok(r) => {
                assert_eq!(r.status(), 200);
                tracecode(&r);
                if let Ok(b) = r.bytes() {
                    panic!(
                        "a cut answer came back as complete ({} bytes: {:?})",
                        b.len(),
                        String::from_utf8_lossy(&b)
                    );
                }
            }
            Err(e) => assert!(
                !e.is_timeout(),
                "the caller hung instead of seeing the cut: {e}"
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the cut took {:?} to reach the caller",
            started.elapsed()
        );
    }
    // Raw view: the answer ends early and the connection closes.
    let mut c = Raw::connect(t.port);
    c.send(format!("POST /universal/reset/calculation HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes());
    let (status, headers) = c.read_head().expect("the head was sent before the reset");
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-length" && v == "1000"),
        "{headers:?}"
    );
    while c.fill() {}
    assert!(c.buf.len() < 1000, "got {} of 1000 bytes", c.buf.len());
    // What was captured of it is marked as not the whole answer.
    let code = headers
        .iter()
        .find(|(k, _)| k == "x-tracecode")
        .map(|(_, v)| v.clone())
        .unwrap();
    let output = t.get(
        &format!("/account/data/{code}?data_flow_type=OUTPUT"),
        &alice,
    );
    assert_eq!(output.status(), 200);
    assert_eq!(
        header(&output, "x-capture-truncated").as_deref(),
        Some("true")
    );

    // Tollgate keeps serving.
    assert_eq!(
        t.post_json("/universal/plan/calculation", &alice, &json!({}))
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(t.url("/universal/system/version"))
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_chunked_answer_that_breaks_off_never_ends_as_if_whole() {
    // An empty chunk-size line is no last chunk (RFC 9112 7.1: `1*HEXDIG`).
    for fault in [
        Fault::ResetMidChunked,
        Fault::BadChunk,
        Fault::EmptyChunkSize,
    ] {
        let upstream = FaultUpstream::start(fault);
        let t = Tollgate::start_extra(&fault_route("cut", upstream.port, ""));
        let alice = t.token("alice");
        let mut c = Raw::connect(t.port);
        c.send(format!("POST /universal/cut/calculation HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes());
        let (status, headers) = c.read_head().expect("the head was sent before the cut");
        assert_eq!(status, 200);
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "transfer-encoding" && v == "chunked"),
            "{headers:?}"
        );
        let started = Instant::now();
        while c.fill() {}
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the cut took {:?} to reach the caller",
            started.elapsed()
        );
        let rest = String::from_utf8_lossy(&c.buf).to_string();
        assert!(
            !rest.ends_with("0\r\n\r\n"),
            "a cut chunked answer ended with its last chunk, as if whole: {rest:?}"
        );
        // Tollgate keeps serving.
        assert_eq!(
            t.post_json("/universal/plan/calculation", &alice, &json!({}))
                .status(),
            200
        );
        assert!(
            !t.log().contains("Fail to filter request"),
            "a cut answer is counted, not logged as an error:\n{}",
            t.log()
        );
    }
}

#[test]
fn an_answer_in_a_coding_tollgate_cannot_take_off_is_a_502() {
    // A trailing empty element or an unasked-for 101 would have the answer read unframed,
    // the upstream's bytes passed on raw (a second answer hidden in them reaching the caller).
    for fault in [
        Fault::GzipCoded,
        Fault::CodedWithLength,
        Fault::ChunkedTrailingComma,
        Fault::SwitchingUnasked,
    ] {
        let upstream = FaultUpstream::start(fault);
        let t = Tollgate::start_extra(&fault_route("coded", upstream.port, ""));
        let alice = t.token("alice");
        let started = Instant::now();
        let r = client()
            .post(t.url("/universal/coded/calculation"))
            .bearer_auth(&alice)
            .body("{}")
            .send()
            .unwrap();
        assert_upstream_error(r, 502);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "answered after {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_chunk_size_line_without_digits_or_with_control_bytes_is_a_400_and_smuggles_nothing() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    // The last two: a control character in an extension (a bare LF ends the line for
    // readers that take LF for a line end, and for no one else; both would read a last chunk
    // whose trailers swallow the request behind it, or not).
    for size_line in ["", ";ext", " ", "0;a\n", "0;a\u{0}b"] {
        // Read as a last chunk, the empty line would end the body after "abc" and the request
        // behind it would be served on its own.
        let wire = format!(
            "POST /demo/echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n{size_line}\r\nGET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n\r\n0\r\n\r\n"
        );
        let mut c = Raw::connect(t.port);
        c.send(wire.as_bytes());
        let r = c.read_response().expect("the request is answered");
        assert_eq!(r.status, 400, "{size_line:?}");
        assert_eq!(r.header("connection"), Some("close"));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_error_shape(&body, "UNIVERSAL");
        assert!(
            c.read_response().is_none(),
            "{size_line:?}: a second answer, to a request hidden in the body"
        );
    }
    assert_eq!(demo_count(&t, "/demo/echo"), 0);
    assert_eq!(demo_count(&t, "/universal/system/version"), 0);
}

// ---------------------------------------------------------------------------------------------
// System endpoints

#[test]
fn system_version_and_health_check() {
    let t = Tollgate::start();
    let r = client()
        .get(t.url("/account/system/version"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json_body(r);
    let major = v["major"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let minor = v["minor"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let build = v["build"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!((1..=100).contains(&major), "{v}");
    assert!(minor <= 111, "{v}");
    assert!((1..=64).contains(&build.len()), "{v}");

    let r = client().get(t.url("/account/system/check")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json_body(r)["health"].as_f64(), Some(1.0));
    drop(t);

    let t = Tollgate::start_extra(&fault_route("dead", free_port(), ""));
    let started = Instant::now();
    let r = client().get(t.url("/account/system/check")).send().unwrap();
    assert_eq!(r.status(), 200);
    let health = json_body(r)["health"].as_f64().unwrap();
    assert!(
        (0.0..1.0).contains(&health),
        "health {health} with an upstream down"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

// ---------------------------------------------------------------------------------------------
// Metrics

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn the_metrics_listener_serves_get_and_head_and_keeps_its_connection() {
    let t = Tollgate::start();
    let mut c = Raw::connect(t.metrics_port);
    // Three requests sent at once: each answer has its length, so all three are answered.
    c.send(
        b"GET /nothing HTTP/1.1\r\nHost: m\r\n\r\n\
          POST /metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\n\r\n\
          GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n",
    );
    let missing = c.read_response().expect("an answer to the unknown path");
    assert_eq!(missing.status, 404);
    let posted = c.read_response().expect("an answer to the POST");
    assert_eq!(posted.status, 405);
    assert_eq!(posted.header("allow"), Some("GET, HEAD"));
    let got = c
        .read_response()
        .expect("the metrics, on the same connection");
    assert_eq!(got.status, 200);
    assert!(String::from_utf8_lossy(&got.body).contains("tollgate_in_flight_requests"));
    // HEAD: the length of what GET sends, and no body.
    let mut c = Raw::connect(t.metrics_port);
    c.send(b"HEAD /metrics HTTP/1.1\r\nHost: m\r\n\r\nGET /nothing HTTP/1.1\r\nHost: m\r\n\r\n");
    let (status, headers) = c.read_head().expect("an answer to HEAD");
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-length" && v != "0"),
        "{headers:?}"
    );
    let next = c
        .read_response()
        .expect("the next answer, right after the head");
    assert_eq!(next.status, 404);
}

#[test]
fn metrics_count_calls_by_label_without_user_names() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    for _ in 0..3 {
        assert_eq!(
            t.post_json(
                "/universal/plan/calculation",
                &alice,
                &json!({"locations": [1]})
            )
            .status(),
            200
        );
    }
    let failed = client()
        .post(t.url("/universal/plan/calculation"))
        .bearer_auth(&alice)
        .header("x-demo-status", "503")
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(failed.status(), 503);
    assert_eq!(
        client()
            .post(t.url("/universal/plan/calculation"))
            .json(&json!({}))
            .send()
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        t.post_json(
            "/routing/matrix/calculation",
            &alice,
            &json!({"waypoints": [1]})
        )
        .status(),
        200
    );

    let plan = |class: &str| {
        format!("tollgate_requests_total{{method_group=\"PLAN\",service=\"UNIVERSAL\",status_class=\"{class}\"}}")
    };
    let mut text = String::new();
    let counted = eventually(Duration::from_secs(5), || {
        text = t.metrics();
        metric(&text, &plan("2xx")) == Some(3.0)
            && metric(&text, &plan("5xx")) == Some(1.0)
            && metric(&text, &plan("4xx")) == Some(1.0)
            && metric(&text, "tollgate_requests_total{method_group=\"MATRIX\",service=\"ROUTING\",status_class=\"2xx\"}") == Some(1.0)
    });
    assert!(counted, "requests_total does not count the calls:\n{text}");
    assert_eq!(
        metric(
            &text,
            "tollgate_request_duration_seconds_count{method_group=\"PLAN\",service=\"UNIVERSAL\"}"
        ),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "tollgate_upstream_duration_seconds_count{method_group=\"PLAN\",service=\"UNIVERSAL\"}"
        ),
        Some(4.0),
        "the 401 never reached the upstream:\n{text}"
    );
    assert!(text.contains("tollgate_request_duration_seconds_bucket{method_group=\"PLAN\",service=\"UNIVERSAL\",le=\"+Inf\"} 5"), "{text}");
    assert!(
        metric(
            &text,
            "tollgate_request_duration_seconds_sum{method_group=\"PLAN\",service=\"UNIVERSAL\"}"
        )
        .is_some_and(|s| s > 0.0),
        "{text}"
    );
    for secret in ["alice", "acme", &alice[..], &alice[alice.len() - 20..]] {
        assert!(!text.contains(secret), "metrics show {secret:?}:\n{text}");
    }

    // The in-flight gauge follows a slow call.
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &t.metrics(),
            "tollgate_in_flight_requests"
        ) == Some(0.0)),
        "{}",
        t.metrics()
    );
    let url = t.url("/universal/plan/calculation");
    let token = alice.clone();
    let slow = std::thread::spawn(move || {
        client()
            .post(url)
            .bearer_auth(token)
            .header("x-demo-delay-ms", "1000")
            .json(&json!({}))
            .send()
            .unwrap()
            .status()
    });
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &t.metrics(),
            "tollgate_in_flight_requests"
        ) == Some(1.0)),
        "{}",
        t.metrics()
    );
    assert_eq!(slow.join().unwrap(), 200);
    assert!(
        eventually(Duration::from_secs(5), || metric(
            &t.metrics(),
            "tollgate_in_flight_requests"
        ) == Some(0.0)),
        "{}",
        t.metrics()
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[test]
fn sigterm_lets_the_call_in_flight_finish_and_exits_0() {
    let mut t = Tollgate::start();
    let alice = t.token("alice");
    let url = t.url("/universal/plan/calculation");
    let call = std::thread::spawn(move || {
        let r = client()
            .post(url)
            .bearer_auth(alice)
            .header("x-demo-delay-ms", "1500")
            .json(&json!({"locations": [1]}))
            .send();
        r.map(|r| {
            let connection = r
                .headers()
                .get("connection")
                .map(|v| v.to_str().unwrap().to_string());
            (
                r.status().as_u16(),
                connection,
                r.text().unwrap_or_default(),
            )
        })
        .map_err(|e| e.to_string())
    });
    assert!(
        eventually(Duration::from_secs(5), || t.demo_stats()["in_flight"] == 1),
        "the slow call never reached the upstream"
    );
    // A connection idle between requests is closed as the drain begins, not after it.
    let mut idle = Raw::connect(t.port);
    idle.send(b"GET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(idle.read_response().map(|r| r.status), Some(200));
    let watcher = std::thread::spawn(move || {
        let waiting = Instant::now();
        let closed = !idle.fill();
        (closed, waiting.elapsed())
    });
    let code = t.terminate();
    let (closed, after) = watcher.join().unwrap();
    assert!(
        closed && after < Duration::from_millis(1200),
        "the idle connection stayed open {after:?} into a 1.5 s drain"
    );
    let answer = call.join().unwrap();
    let (status, connection, body) = answer.unwrap_or_else(|e| {
        panic!(
            "the call in flight was dropped at SIGTERM: {e}\n{}",
            t.log()
        )
    });
    assert_eq!(status, 200, "{body}");
    // Begun before the drain, answered during it: the connection will not be read again.
    assert_eq!(connection.as_deref(), Some("close"), "{body}");
    assert_eq!(code, Some(0), "{}", t.log());
}

/// Starts a call the demo upstream holds for `delay_ms`, and waits until it is there; joined,
/// its status, or why it got none.
fn slow_call_in_flight(
    t: &Tollgate,
    delay_ms: u64,
) -> std::thread::JoinHandle<Result<u16, String>> {
    let alice = t.token("alice");
    let url = t.url("/universal/plan/calculation");
    let call = std::thread::spawn(move || {
        client()
            .post(url)
            .bearer_auth(alice)
            .header("x-demo-delay-ms", delay_ms.to_string())
            .json(&json!({"locations": [1]}))
            .send()
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    });
    assert!(
        eventually(Duration::from_secs(5), || t.demo_stats()["in_flight"] == 1),
        "the slow call never reached the upstream"
    );
    call
}

#[test]
fn sigint_drains_the_calls_in_flight_too() {
    // Ctrl-C on a foreground server: the call sent on before it is answered and on record,
    // not cut.
    let mut t = Tollgate::start();
    let call = slow_call_in_flight(&t, 1500);
    let code = t.stop_with(libc::SIGINT);
    assert_eq!(call.join().unwrap(), Ok(200), "{}", t.log());
    assert_eq!(code, Some(0), "{}", t.log());
}

#[test]
fn sigint_during_a_drain_stops_at_once() {
    let mut t = Tollgate::start();
    let call = slow_call_in_flight(&t, 8000);
    let pid = t.pid() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(500));
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let interrupted = Instant::now();
    t.terminate();
    // The drain would wait up to shutdown_timeout_seconds (5) for the 8 s call.
    assert!(
        interrupted.elapsed() < Duration::from_secs(3),
        "stopped {:?} after SIGINT\n{}",
        interrupted.elapsed(),
        t.log()
    );
    assert!(t.log().contains("SIGINT during the drain"), "{}", t.log());
    // The call is cut, or answered 502 when its upstream (the demo, in the same process)
    // stopped a moment before the proxy: never as if it had been served.
    let got = call.join().unwrap();
    assert!(
        matches!(got, Err(_) | Ok(502)),
        "the cut call got an answer {got:?}\n{}",
        t.log()
    );
}

#[test]
fn sigterm_lets_an_account_request_whose_body_is_still_arriving_finish() {
    let mut t = Tollgate::start();
    let body = br#"{"username":"alice","password":"alice-password-1","ttl_seconds":600}"#;
    let (first, rest) = body.split_at(20);
    let mut login = Raw::connect(t.port);
    login.send(
        format!(
            "POST /account/token/generation HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    login.send(first);
    // The head is in and the body is being read: no proxied call is in flight.
    std::thread::sleep(Duration::from_millis(200));
    let pid = t.pid() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(700));
    // A closed socket shows as no answer below.
    let _ = login.s.write_all(rest);
    let r = login
        .read_response()
        .unwrap_or_else(|| panic!("the login being read at SIGTERM was cut\n{}", t.log()));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let token: String = serde_json::from_slice(&r.body).expect("a JSON string");
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(t.terminate(), Some(0), "{}", t.log());
}

#[test]
fn a_connection_accepted_while_draining_is_answered_with_connection_close() {
    let mut t = start_with_config_edit(Setup::default(), |c| {
        c.replace("grace_period_seconds = 0", "grace_period_seconds = 2")
    });
    // A slow call keeps the drain going while the new connection comes.
    let call = slow_call_in_flight(&t, 4000);
    unsafe {
        libc::kill(t.pid() as i32, libc::SIGTERM);
    }
    let signalled = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let mut late = Raw::connect(t.port);
    // Its head comes a moment after the connection.
    std::thread::sleep(Duration::from_millis(100));
    late.send(b"GET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let r = late
        .read_response()
        .expect("no answer to a request sent while draining");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    // After the grace period, while the slow call still drains, a new connection gets no
    // answer: the listener is as good as closed.
    std::thread::sleep(Duration::from_millis(2400).saturating_sub(signalled.elapsed()));
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", t.port)) {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(b"GET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            answer.is_empty(),
            "answered after the grace period: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(call.join().unwrap(), Ok(200));
    assert_eq!(t.terminate(), Some(0), "{}", t.log());
}

#[test]
fn an_idle_server_keeps_accepting_for_the_grace_period_after_sigterm() {
    let mut t = start_with_config_edit(Setup::default(), |c| {
        c.replace("grace_period_seconds = 0", "grace_period_seconds = 1")
    });
    unsafe {
        libc::kill(t.pid() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut late = Raw::connect(t.port);
    late.send(b"GET /universal/system/version HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let r = late
        .read_response()
        .expect("a connection made within the grace period is answered");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(t.terminate(), Some(0), "{}", t.log());
}

// ---------------------------------------------------------------------------------------------
// CLI

#[test]
fn check_config_lists_every_problem_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "127.0.0.1:8080"
colour = "blue"

[[upstreams]]
name = "demo"
address = "127.0.0.1:8090"

[[routes]]
method = "get"
path = "/universal/plan/calculation"
upstream = "demo"
service = "NOPE"
method_group = "PLAN"
operation = "run_plan_calculation"
"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad config passed:\n{text}");
    for (key, word) in [
        ("server.colour", "colour"),
        ("routes[0].service", "NOPE"),
        ("routes[0].method", "get"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(key) && l.contains(word)),
            "{key} ({word}) is not reported:\n{text}"
        );
    }

    let default = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&default)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "config/default.toml: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

/// A [`ScriptedUpstream`]'s script: what to do with the `n`th request of a connection, whose
/// head (lowercased) is given.
type ScriptFn = fn(usize, &str) -> Script;

/// What a [`ScriptedUpstream`] does with the `n`th request (from 1) of a connection.
enum Script {
    Answer(&'static [u8]),
    /// Answers, then sends more bytes a moment later (as a broken upstream might).
    AnswerThenLate(&'static [u8], &'static [u8]),
    /// Sends these bytes (an answer begun) and closes the connection.
    AnswerThenClose(&'static [u8]),
    /// Closes the connection without answering (as a crash or its own timeout would).
    Drop,
}

/// A raw upstream that reads requests (head and Content-Length body) and does with each what
/// its script says. It counts every request it read whole.
struct ScriptedUpstream {
    port: u16,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const ANSWER_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

impl ScriptedUpstream {
    /// Answers the first request of each connection and drops the connection after reading
    /// the second one without answering.
    fn closing_after_second_request() -> Self {
        Self::start(|n, _| {
            if n == 1 {
                Script::Answer(ANSWER_OK)
            } else {
                Script::Drop
            }
        })
    }

    /// `script(n, head)`: what to do with the `n`th request of a connection, whose head
    /// (lowercased) is `head`.
    fn start(script: ScriptFn) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let seen = seen2.clone();
                std::thread::spawn(move || {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut c = Raw { s, buf: Vec::new() };
                    for n in 1.. {
                        // Read one request head and its Content-Length body.
                        let Some(end) = (loop {
                            if let Some(i) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break Some(i);
                            }
                            if !c.fill() {
                                break None;
                            }
                        }) else {
                            return;
                        };
                        let head = String::from_utf8_lossy(&c.buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        c.buf.drain(..end + 4);
                        while c.buf.len() < len {
                            if !c.fill() {
                                return;
                            }
                        }
                        c.buf.drain(..len);
                        seen.fetch_add(1, Ordering::SeqCst);
                        match script(n, &head) {
                            Script::Answer(bytes) => c.send(bytes),
                            Script::AnswerThenLate(bytes, late) => {
                                c.send(bytes);
                                std::thread::sleep(Duration::from_millis(200));
                                c.send(late);
                            }
                            Script::AnswerThenClose(bytes) => {
                                c.send(bytes);
                                return;
                            }
                            Script::Drop => return,
                        }
                    }
                });
            }
        });
        ScriptedUpstream { port, seen, stop }
    }

    fn seen(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tollgate on the default setup with a route of any method under `/universal/flaky/` to
    /// this upstream.
    fn behind_tollgate(&self) -> Tollgate {
        Tollgate::start_extra(&format!(
            r#"
[[upstreams]]
name = "flaky"
address = "127.0.0.1:{}"

[[routes]]
method = "*"
path = "/universal/flaky/*"
upstream = "flaky"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "flaky_calculation"
"#,
            self.port
        ))
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn a_post_the_upstream_read_is_never_sent_twice_but_a_get_is_retried() {
    let up = ScriptedUpstream::closing_after_second_request();
    let t = up.behind_tollgate();
    let alice = t.token("alice");
    // The upstream answers the first request of each connection and drops the second unanswered
    // after reading it. A call on a fresh connection is answered (and the connection pooled); a
    // call on the pooled one meets the drop. Which one a call gets is the pool's business (a
    // release racing the next call may open a fresh connection), so each call is judged by what
    // it met, until both kinds were seen.
    let (mut answered, mut dropped) = (0, 0);
    for _ in 0..20 {
        let before = up.seen();
        let r = t.post_json("/universal/flaky/calculation", &alice, &json!({}));
        assert_eq!(
            up.seen() - before,
            1,
            "a POST the upstream had read was sent again"
        );
        if r.status() == 200 {
            answered += 1;
        } else {
            // The upstream may have acted on it: 502, not a second computation.
            assert_upstream_error(r, 502);
            dropped += 1;
        }
        if answered > 0 && dropped > 0 {
            break;
        }
    }
    assert!(
        answered > 0 && dropped > 0,
        "answered {answered}, dropped {dropped}"
    );

    // A GET in the same situation is safe to repeat, so the caller never sees the dropped
    // connection: it is retried once on a fresh one.
    let mut retried = false;
    for _ in 0..20 {
        let before = up.seen();
        let r = t.get("/universal/flaky/state", &alice);
        assert_eq!(
            r.status(),
            200,
            "a GET on a connection the upstream dropped is retried"
        );
        let sent = up.seen() - before;
        assert!((1..=2).contains(&sent), "sent {sent} times");
        if sent == 2 {
            retried = true;
            break;
        }
    }
    assert!(retried, "no GET met a dropped pooled connection");
}

#[test]
fn a_get_answered_wrongly_on_a_reused_connection_is_not_sent_again() {
    // An answer begun is an answer: the upstream may have acted on the request, and asking
    // again would run it twice. Only a connection closed before any byte of an answer is
    // retried. Each upstream answers the first request of a connection well, the second so.
    let cases: [(&str, ScriptFn); 4] = [
        ("a malformed status line", |n, _| match n {
            1 => Script::Answer(ANSWER_OK),
            _ => Script::Answer(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok"),
        }),
        ("a status outside 100-599", |n, _| match n {
            1 => Script::Answer(ANSWER_OK),
            _ => Script::Answer(b"HTTP/1.1 999 Weird\r\nContent-Length: 2\r\n\r\nok"),
        }),
        ("a head begun, then a close", |n, _| match n {
            1 => Script::Answer(ANSWER_OK),
            _ => Script::AnswerThenClose(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n"),
        }),
        ("100 Continue, then a close", |n, _| match n {
            1 => Script::Answer(ANSWER_OK),
            _ => Script::AnswerThenClose(b"HTTP/1.1 100 Continue\r\n\r\n"),
        }),
    ];
    for (case, script) in cases {
        let up = ScriptedUpstream::start(script);
        let t = up.behind_tollgate();
        let alice = t.token("alice");
        let mut failed = 0;
        for _ in 0..20 {
            let before = up.seen();
            let r = t.get("/universal/flaky/state", &alice);
            assert_eq!(up.seen() - before, 1, "{case}: a GET was sent again");
            if r.status() != 200 {
                assert_upstream_error(r, 502);
                failed += 1;
                if failed == 2 {
                    break;
                }
            }
        }
        assert_eq!(failed, 2, "{case}: no GET met the second answer");
    }
}

#[test]
fn a_connection_whose_answer_announced_a_body_it_did_not_send_is_not_reused() {
    // A HEAD's answer announces the body a GET would get and sends none; an upstream that
    // sends it anyway, late, would have those bytes read as the next call's answer.
    let up = ScriptedUpstream::start(|n, head| match (n, head.starts_with("head ")) {
        (1, true) => Script::AnswerThenLate(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!",
        ),
        (1, false) => Script::Answer(ANSWER_OK),
        _ => Script::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nreused"),
    });
    let t = up.behind_tollgate();
    let alice = t.token("alice");
    for _ in 0..3 {
        let r = client()
            .head(t.url("/universal/flaky/state"))
            .bearer_auth(&alice)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = t.get("/universal/flaky/state", &alice);
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.text().unwrap(),
            "ok",
            "the GET went on the HEAD's connection"
        );
    }
}

#[test]
fn hop_by_hop_fields_named_by_connection_and_dot_segments_and_bad_hosts() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    // Fields the caller's Connection names are its connection's own (RFC 9110 7.6.1).
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("Connection", "keep-alive, X-Hop")
        .header("X-Hop", "secret")
        .header("X-Custom", "kept")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = seen_headers(&r);
    assert!(seen.get("x-hop").is_none(), "{seen}");
    assert_eq!(seen["x-custom"], "kept", "{seen}");
    // Also when another token of the list is not ASCII.
    let mut c = Raw::connect(t.port);
    let mut request = format!(
        "POST /demo/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 2\r\nX-Hop: secret\r\nConnection: X-Hop, "
    )
    .into_bytes();
    request.extend_from_slice(b"\xe9t\xe9\r\n\r\n{}");
    c.send(&request);
    let (status, headers) = c.read_head().expect("an answer");
    assert_eq!(status, 200);
    let seen = seen_headers_raw(&headers);
    assert!(seen.get("x-hop").is_none(), "{seen}");

    // A path with dot segments could reach, at an upstream that resolves them, a path of
    // another route's rules: refused, in any spelling, before any upstream sees it.
    let before = demo_count(&t, "/universal/system/version");
    for path in [
        "/universal/../universal/system/version",
        "/universal/%2e%2e/universal/system/version",
        "/universal/./system/version",
    ] {
        let text = raw_text(
            t.port,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        );
        assert!(text.starts_with("HTTP/1.1 400"), "{path}: {text}");
        assert!(text.contains("dot segments"), "{path}: {text}");
    }
    assert_eq!(demo_count(&t, "/universal/system/version"), before);

    // A Host that is no host (RFC 9112 3.2).
    for host in ["x y", "x/evil", "a@b", "x:abc", "[::1"] {
        let text = raw_text(
            t.port,
            &format!("GET /universal/system/version HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert!(text.starts_with("HTTP/1.1 400"), "{host}: {text}");
        assert!(text.contains("\"tracedata\""), "{host}: {text}");
    }
}

#[test]
fn an_http_1_0_caller_is_never_sent_100_continue_and_its_call_gets_a_host_upstream() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let mut c = Raw::connect(t.port);
    c.send(
        format!(
            "POST /demo/echo HTTP/1.0\r\nAuthorization: Bearer {alice}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    // RFC 9110 10.1.1: the expectation of an HTTP/1.0 request is ignored; the body follows.
    std::thread::sleep(Duration::from_millis(300));
    c.send(b"hello");
    let (status, headers) = c.read_head().expect("an answer");
    assert_eq!(
        status, 200,
        "an HTTP/1.0 caller got an interim answer first"
    );
    let seen = seen_headers_raw(&headers);
    // The upstream is spoken to in HTTP/1.1, which needs a Host.
    assert!(seen.get("host").is_some(), "{seen}");
}

#[test]
fn head_is_served_where_get_is_and_unknown_codings_are_refused() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    // The demo's routes name GET; a HEAD reaches the same upstream endpoint (RFC 9110 9.3.2).
    let r = client()
        .head(t.url("/universal/system/version"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "x-tracecode").is_some());
    assert_eq!(r.bytes().unwrap().len(), 0);
    // And on the account API's reads.
    let r = client()
        .head(t.url("/account/system/version"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-length").is_some_and(|n| n != "0"));
    assert_eq!(r.bytes().unwrap().len(), 0);
    // Also on an async process's follow-up route, where the process must be the caller's.
    let r = client()
        .head(t.url("/universal/plan/result/00000000-0000-4000-8000-000000000000"))
        .bearer_auth(&alice)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "no such process");

    // A coding besides chunked: not forwarded as if the bytes were plain.
    let before = demo_count(&t, "/demo/echo");
    let text = raw_text(
        t.port,
        &format!(
            "POST /demo/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
    );
    assert!(text.starts_with("HTTP/1.1 501"), "{text}");
    assert!(
        text.contains("Transfer-Encoding") && text.contains("\"tracedata\""),
        "{text}"
    );
    // Refused before the route's work began, the tracedata still names the route's service
    // and operation.
    assert!(
        text.contains("\"service\":\"UNIVERSAL\"")
            && text.contains("\"operation\":\"echo_payload\""),
        "{text}"
    );
    assert_eq!(demo_count(&t, "/demo/echo"), before);
    // Chunked twice is no unknown coding but a malformed body: 400.
    let text = raw_text(
        t.port,
        &format!(
            "POST /demo/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
    );
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("chunked must be applied only once"), "{text}");
    assert_eq!(demo_count(&t, "/demo/echo"), before);
    // `chunked,` (an empty element last): read as no body, the chunks would be taken for the
    // next request, which a front proxy reading them as chunks never sent. Refused (pingora
    // finds the head invalid already).
    let text = raw_text(
        t.port,
        &format!(
            "POST /demo/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nTransfer-Encoding: chunked,\r\n\r\n3d\r\nGET /universal/system/version HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaa\r\n\r\n\r\n0\r\n\r\n"
        ),
    );
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(text.matches("X-Tracecode:").count(), 1, "{text}");
    assert_eq!(demo_count(&t, "/demo/echo"), before);

    // An empty POST says its length upstream (RFC 9110 8.6).
    let mut c = Raw::connect(t.port);
    c.send(
        format!("POST /demo/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\r\n")
            .as_bytes(),
    );
    let (status, headers) = c.read_head().expect("an answer");
    assert_eq!(status, 200);
    let seen = seen_headers_raw(&headers);
    assert_eq!(seen["content-length"], "0", "{seen}");
}

#[test]
fn an_absolute_form_target_reaches_the_upstream_in_origin_form() {
    // RFC 9112 3.2.2: a server takes absolute form; an origin server behind Tollgate is sent
    // origin form (3.2.1), which every origin must read.
    let up = ScriptedUpstream::start(|_, head| {
        if head.starts_with("get /universal/flaky/state?x=1 http/1.1") {
            Script::Answer(ANSWER_OK)
        } else {
            Script::Answer(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        }
    });
    let t = up.behind_tollgate();
    let alice = t.token("alice");
    let text = raw_text(
        t.port,
        &format!(
            "GET http://127.0.0.1:{port}/universal/flaky/state?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n",
            port = t.port
        ),
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok"), "{text}");
}

#[test]
fn a_length_sent_twice_reaches_the_caller_once() {
    let up = ScriptedUpstream::start(|n, _| {
        if n % 2 == 1 {
            Script::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
        } else {
            Script::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok")
        }
    });
    let t = up.behind_tollgate();
    let alice = t.token("alice");
    let mut c = Raw::connect(t.port);
    for _ in 0..2 {
        c.send(
            format!("GET /universal/flaky/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\r\n")
                .as_bytes(),
        );
        let answer = c.read_response().expect("an answer");
        assert_eq!(answer.status, 200);
        let lengths: Vec<&str> = answer
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(lengths, ["2"]);
        assert_eq!(answer.body, b"ok");
    }
}

#[test]
fn an_expectation_list_naming_100_continue_is_answered_with_100() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let mut c = Raw::connect(t.port);
    c.send(
        format!(
            "POST /demo/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 5\r\nExpect: 100-continue, x-other\r\n\r\n"
        )
        .as_bytes(),
    );
    let (status, _) = c.read_head().expect("an interim answer");
    assert_eq!(status, 100);
    c.send(b"hello");
    let answer = c.read_response().expect("the answer");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"hello");
}
