//! What Tollgate keeps of every call, tested against the real binary with real traffic through
//! it: the captured input and output of every stage (`/account/data`), the audit
//! (`/account/audit`), the daily statistics and the XLSX report, and the documentation files.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::time::Duration;

use calamine::{open_workbook_from_rs, Data, Reader, Xlsx};
use chrono::{DateTime, FixedOffset, NaiveDate, SecondsFormat, Utc};
use reqwest::blocking::Response;

// ---------------------------------------------------------------- helpers

/// One proxied exchange as the caller saw it.
#[derive(Debug)]
struct Seen {
    status: u16,
    code: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

fn header(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn seen(r: Response) -> Seen {
    let status = r.status().as_u16();
    let code = header(&r, "x-tracecode").expect("every proxied answer carries X-Tracecode");
    let content_type = header(&r, "content-type");
    let body = r.bytes().unwrap().to_vec();
    Seen {
        status,
        code,
        content_type,
        body,
    }
}

/// Sends `body` as is (no re-serialisation) with the given content type and extra headers.
fn send(
    t: &Tollgate,
    method: reqwest::Method,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Seen {
    let mut rb = client().request(method, t.url(path)).bearer_auth(token);
    if let Some(ct) = content_type {
        rb = rb.header("content-type", ct);
    }
    if !body.is_empty() {
        rb = rb.body(body.to_vec());
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    seen(rb.send().unwrap())
}

fn post(t: &Tollgate, path: &str, token: &str, body: &Value) -> Seen {
    send(
        t,
        reqwest::Method::POST,
        path,
        token,
        Some("application/json"),
        &serde_json::to_vec(body).unwrap(),
        &[],
    )
}

/// Starts an asynchronous plan process as `token`'s user: its first answer and the path that
/// follows it up.
fn start_process(t: &Tollgate, token: &str) -> (Seen, String) {
    let start = post(
        t,
        "/universal/plan/calculation_async",
        token,
        &plan_task(&[1]),
    );
    assert_eq!(start.status, 202);
    let path = format!("/universal/plan/calculation_async/{}", start.code);
    (start, path)
}

/// A plan task with `keys.len()` locations, whose unique key is `/key`.
fn plan_task(keys: &[i64]) -> Value {
    json!({"locations": keys.iter().map(|k| json!({"key": k})).collect::<Vec<_>>()})
}

/// Every call here lasts at least 2 ms (`x-demo-delay-ms`), so calls made one after another
/// start in different milliseconds, the audit's time resolution, and list in call order.
const SPACED: &[(&str, &str)] = &[("x-demo-delay-ms", "2")];

fn plan(t: &Tollgate, token: &str, keys: &[i64]) -> Seen {
    let body = serde_json::to_vec(&plan_task(keys)).unwrap();
    let s = send(
        t,
        reqwest::Method::POST,
        "/universal/plan/calculation",
        token,
        Some("application/json"),
        &body,
        SPACED,
    );
    assert_eq!(s.status, 200, "{}", String::from_utf8_lossy(&s.body));
    s
}

fn matrix(t: &Tollgate, token: &str, waypoints: usize) -> Seen {
    let w: Vec<Value> = (0..waypoints)
        .map(|i| json!({"lat": 55.0 + i as f64, "lon": 37.0}))
        .collect();
    let body = serde_json::to_vec(&json!({"waypoints": w})).unwrap();
    let s = send(
        t,
        reqwest::Method::POST,
        "/routing/matrix/calculation",
        token,
        Some("application/json"),
        &body,
        SPACED,
    );
    assert_eq!(s.status, 200, "{}", String::from_utf8_lossy(&s.body));
    s
}

fn data(t: &Tollgate, token: &str, code: &str, query: &str) -> Response {
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    t.get(&format!("/account/data/{code}{q}"), token)
}

fn data_ok(t: &Tollgate, token: &str, code: &str, query: &str) -> Vec<u8> {
    let r = data(t, token, code, query);
    assert_eq!(
        r.status(),
        200,
        "data {code}?{query}: {}",
        r.text().unwrap()
    );
    r.bytes().unwrap().to_vec()
}

fn json_of(r: Response) -> Value {
    let status = r.status();
    let text = r.text().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"))
}

fn audit(t: &Tollgate, token: &str, query: &[(&str, &str)]) -> Value {
    let r = client()
        .get(t.url("/account/audit"))
        .bearer_auth(token)
        .query(query)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "audit {query:?}");
    json_of(r)
}

fn audit_status(t: &Tollgate, token: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let r = client()
        .get(t.url("/account/audit"))
        .bearer_auth(token)
        .query(query)
        .send()
        .unwrap();
    (r.status().as_u16(), json_of(r))
}

fn codes(page: &Value) -> Vec<String> {
    page["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["tracedata"]["code"].as_str().unwrap().to_string())
        .collect()
}

fn totals(page: &Value) -> (u64, u64) {
    (
        page["statistics"]["overall"]["total"].as_u64().unwrap(),
        page["statistics"]["filter"]["total"].as_u64().unwrap(),
    )
}

fn stats(t: &Tollgate, token: &str, query: &str) -> (u16, Value) {
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    let r = t.get(&format!("/account/statistics{q}"), token);
    (r.status().as_u16(), json_of(r))
}

/// statistics JSON -> {(date, service, method_group): (points, unique)}
fn stats_table(v: &Value) -> BTreeMap<(String, String, String), (u64, u64)> {
    let mut out = BTreeMap::new();
    for d in v["dates"].as_array().unwrap() {
        for s in d["services"].as_array().unwrap() {
            for m in s["methods"].as_array().unwrap() {
                let key = (
                    d["date"].as_str().unwrap().to_string(),
                    s["service"].as_str().unwrap().to_string(),
                    m["method_group"].as_str().unwrap().to_string(),
                );
                let prev = out.insert(
                    key.clone(),
                    (
                        m["points_per_day"].as_u64().unwrap(),
                        m["unique_points_per_day"].as_u64().unwrap(),
                    ),
                );
                assert!(prev.is_none(), "{key:?} listed twice in {v}");
            }
        }
    }
    out
}

/// Today in a timezone `hours` east of UTC.
fn today_at(hours: i64) -> NaiveDate {
    (Utc::now() + chrono::Duration::hours(hours)).date_naive()
}

fn workbook(bytes: Vec<u8>) -> Xlsx<Cursor<Vec<u8>>> {
    open_workbook_from_rs(Cursor::new(bytes)).expect("the answer opens as an XLSX workbook")
}

fn rows(wb: &mut Xlsx<Cursor<Vec<u8>>>, sheet: &str) -> Vec<Vec<Data>> {
    let range = wb
        .worksheet_range(sheet)
        .unwrap_or_else(|e| panic!("sheet {sheet}: {e}"));
    range.rows().map(|r| r.to_vec()).collect()
}

fn text(d: &Data) -> String {
    match d {
        Data::String(s) => s.clone(),
        Data::Float(f) => f.to_string(),
        Data::Int(i) => i.to_string(),
        Data::Bool(b) => b.to_string(),
        Data::Empty => String::new(),
        other => format!("{other:?}"),
    }
}

fn number(d: &Data) -> f64 {
    match d {
        Data::Float(f) => *f,
        Data::Int(i) => *i as f64,
        other => panic!("not a number cell: {other:?}"),
    }
}

/// A real date cell (not text), as a date.
fn date_cell(d: &Data) -> NaiveDate {
    match d {
        Data::DateTime(dt) => {
            assert!(dt.is_datetime(), "{d:?} is a duration, not a date");
            let (y, m, day, ..) = dt.to_ymd_hms_milli();
            NaiveDate::from_ymd_opt(y as i32, m as u32, day as u32).unwrap()
        }
        other => panic!("not a date cell: {other:?}"),
    }
}

/// `PT1.234S`-style ISO 8601 duration, in seconds.
fn iso_seconds(d: &str) -> f64 {
    assert!(
        d.len() >= 3 && d.len() <= 16,
        "duration {d:?} must be 3..16 characters"
    );
    let inner = d
        .strip_prefix("PT")
        .and_then(|s| s.strip_suffix('S'))
        .unwrap_or_else(|| panic!("{d:?} is not PTn.nnnS"));
    inner
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("{d:?} is not PTn.nnnS"))
}

fn status_of_raw(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    let line = text.lines().next().unwrap_or("");
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

fn demo_count(t: &Tollgate, path: &str) -> u64 {
    t.demo_stats()["requests"][path].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------- capture

#[test]
fn a_sync_call_is_captured_byte_exact_and_converts_to_json_and_xlsx() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    // Spacing, a trailing zero and non-ASCII text: any re-serialisation would show.
    let sent = "{\n  \"name\" : \"Привет depot\",\"locations\":[{\"key\":\"a\",\"lat\":55.750},{\"key\":\"b\",\"lat\":55.80}],\n \"orders\":[{\"id\":1},{\"id\":2},{\"id\":3}] }\n".as_bytes();
    let call = send(
        &t,
        reqwest::Method::POST,
        "/universal/plan/calculation",
        &alice,
        Some("application/json; charset=utf-8"),
        sent,
        &[],
    );
    assert_eq!(call.status, 200);

    let r = data(&t, &alice, &call.code, "");
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(header(&r, "x-capture-truncated").as_deref(), Some("false"));
    assert_eq!(
        header(&r, "x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(
        header(&r, "content-security-policy").as_deref(),
        Some("sandbox")
    );
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        sent,
        "INPUT stage 0 ORIGIN is what was sent"
    );
    // The explicit defaults say the same, and a client asking for JSON still gets the bytes.
    let explicit = client()
        .get(t.url(&format!(
            "/account/data/{}?data_flow_type=INPUT&data_flow_stage=0&data_flow_convert=ORIGIN",
            call.code
        )))
        .bearer_auth(&alice)
        .header("accept", "application/json")
        .send()
        .unwrap();
    assert_eq!(explicit.status(), 200);
    assert_eq!(explicit.bytes().unwrap().as_ref(), sent);

    let r = data(&t, &alice, &call.code, "data_flow_type=OUTPUT");
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "content-type"),
        call.content_type,
        "OUTPUT keeps the upstream's content type"
    );
    assert_eq!(
        r.bytes().unwrap().to_vec(),
        call.body,
        "OUTPUT is what the caller received"
    );

    let r = data(&t, &alice, &call.code, "data_flow_convert=JSON");
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type")
        .unwrap()
        .starts_with("application/json"));
    let as_json = r.bytes().unwrap();
    assert_eq!(
        as_json.as_ref(),
        sent,
        "JSON is the captured JSON itself: numbers as written (55.750), members in order"
    );
    let out_json = json_of(data(
        &t,
        &alice,
        &call.code,
        "data_flow_type=OUTPUT&data_flow_convert=JSON",
    ));
    assert_eq!(out_json["result"]["locations"], 2);
    assert_eq!(out_json["tracedata"]["code"], call.code.as_str());

    let r = data(&t, &alice, &call.code, "data_flow_convert=XLSX");
    assert_eq!(r.status(), 200);
    let disposition = header(&r, "content-disposition").expect("an XLSX download names its file");
    assert!(disposition.contains(".xlsx"), "{disposition}");
    let mut wb = workbook(r.bytes().unwrap().to_vec());
    let names: BTreeSet<String> = wb.sheet_names().into_iter().collect();
    assert!(
        names.contains("locations") && names.contains("orders"),
        "one sheet per top-level array: {names:?}"
    );
    let locations = rows(&mut wb, "locations");
    assert_eq!(
        locations.len(),
        3,
        "header + one row per element: {locations:?}"
    );
    let header_row: Vec<String> = locations[0].iter().map(text).collect();
    let (key_col, lat_col) = (
        header_row
            .iter()
            .position(|h| h == "key")
            .expect("a key column"),
        header_row
            .iter()
            .position(|h| h == "lat")
            .expect("a lat column"),
    );
    assert_eq!(text(&locations[1][key_col]), "a");
    assert_eq!(text(&locations[2][key_col]), "b");
    assert_eq!(number(&locations[1][lat_col]), 55.75);
    assert_eq!(number(&locations[2][lat_col]), 55.8);
    let orders = rows(&mut wb, "orders");
    assert_eq!(orders.len(), 4);
    assert_eq!(
        orders[1..]
            .iter()
            .map(|r| number(&r[0]))
            .collect::<Vec<_>>(),
        vec![1.0, 2.0, 3.0]
    );
    // The scalar member lands in a sheet of its own, not lost.
    let fields = names
        .iter()
        .find(|n| !["locations", "orders"].contains(&n.as_str()))
        .expect("a sheet for the scalar members");
    let scalars = rows(&mut wb, fields);
    assert!(
        scalars
            .iter()
            .any(|r| r.iter().any(|c| text(c) == "Привет depot")),
        "{scalars:?}"
    );
}

#[test]
fn an_async_process_fills_stages_zero_to_three_and_stage_three_holds_the_latest() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let task = plan_task(&[1, 2, 3]);
    let start = post(&t, "/universal/plan/calculation_async", &alice, &task);
    assert_eq!(
        start.status,
        202,
        "{}",
        String::from_utf8_lossy(&start.body)
    );
    let code = start.code.clone();
    let state_path = format!("/universal/plan/calculation_async/{code}");
    let result_path = format!("/universal/plan/result/{code}");
    let get = |path: &str| send(&t, reqwest::Method::GET, path, &alice, None, b"", &[]);

    let state1 = get(&state_path);
    let state2 = get(&state_path);
    let result = get(&result_path);
    for (i, s) in [&state1, &state2, &result].iter().enumerate() {
        assert!(
            s.status == 200 || s.status == 202,
            "exchange {}: {}",
            i + 1,
            s.status
        );
        assert_eq!(s.code, code, "a follow-up keeps the process's tracecode");
    }
    let output = |stage: u8| {
        data_ok(
            &t,
            &alice,
            &code,
            &format!("data_flow_type=OUTPUT&data_flow_stage={stage}"),
        )
    };
    let input = |stage: u8| {
        data(
            &t,
            &alice,
            &code,
            &format!("data_flow_type=INPUT&data_flow_stage={stage}"),
        )
    };

    assert_eq!(
        data_ok(&t, &alice, &code, ""),
        serde_json::to_vec(&task).unwrap(),
        "stage 0 INPUT is the task"
    );
    assert_eq!(output(0), start.body);
    assert_eq!(output(1), state1.body);
    assert_eq!(output(2), state2.body);
    assert_eq!(output(3), result.body, "the fourth exchange is stage 3");
    assert_eq!(
        input(1).status(),
        200,
        "a GET's (empty) input is still a stage"
    );

    // The fifth and sixth exchanges overwrite stage 3; stages 0..2 stay.
    let cancel = send(
        &t,
        reqwest::Method::DELETE,
        &state_path,
        &alice,
        None,
        b"",
        &[],
    );
    assert_eq!(cancel.status, 204);
    assert_eq!(
        output(3),
        b"",
        "stage 3 now holds the cancel's empty answer"
    );
    let gone = get(&result_path);
    assert_eq!(gone.status, 404, "the demo forgot the cancelled process");
    assert_eq!(gone.code, code);
    assert_eq!(output(3), gone.body, "stage 3 holds the latest exchange");
    assert_eq!(output(0), start.body);
    assert_eq!(output(1), state1.body);
    assert_eq!(output(2), state2.body);
    assert_eq!(
        data(&t, &alice, &code, "data_flow_stage=4").status(),
        400,
        "there is no stage 4"
    );

    // Every exchange is on record under the one tracecode.
    let page = audit(&t, &alice, &[]);
    assert_eq!(codes(&page), vec![code.clone(); 6], "{page}");
    let ops: Vec<&str> = page["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["tracedata"]["operation"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        [
            "run_plan_calculation_async",
            "read_plan_calculation_state",
            "read_plan_calculation_state",
            "read_plan_result",
            "read_plan_calculation_state",
            "read_plan_result"
        ]
    );
}

#[test]
fn a_body_over_max_capture_bytes_is_proxied_whole_and_its_capture_says_truncated() {
    let t = Tollgate::start_extra("\n[limits]\nmax_capture_bytes = 1000\n");
    let alice = t.token("alice");
    let big: Vec<u8> = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000)).into_bytes();
    let call = send(
        &t,
        reqwest::Method::POST,
        "/demo/echo",
        &alice,
        Some("application/json"),
        &big,
        &[],
    );
    assert_eq!(call.status, 200);
    assert_eq!(
        call.body, big,
        "the caller gets every byte back through the proxy"
    );

    for flow in ["INPUT", "OUTPUT"] {
        let r = data(&t, &alice, &call.code, &format!("data_flow_type={flow}"));
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "x-capture-truncated").as_deref(),
            Some("true"),
            "{flow}"
        );
        let stored = r.bytes().unwrap();
        assert_eq!(stored.len(), 1000, "{flow} keeps max_capture_bytes");
        assert_eq!(
            stored.as_ref(),
            &big[..1000],
            "{flow} keeps the first bytes"
        );
        let r = data(
            &t,
            &alice,
            &call.code,
            &format!("data_flow_type={flow}&data_flow_convert=JSON"),
        );
        assert_eq!(r.status(), 400, "a cut body cannot be converted");
        assert_error_shape(&json_of(r), "ACCOUNT");
    }

    let small = br#"{"pad":"short"}"#;
    let call = send(
        &t,
        reqwest::Method::POST,
        "/demo/echo",
        &alice,
        Some("application/json"),
        small,
        &[],
    );
    let r = data(&t, &alice, &call.code, "");
    assert_eq!(header(&r, "x-capture-truncated").as_deref(), Some("false"));
    assert_eq!(r.bytes().unwrap().as_ref(), small);
}

fn redacting_echo(limits: &str) -> Tollgate {
    echo_route_with("redact = [\"/secret\", \"/auth/key\"]", limits)
}

/// The suite's routes, with `keys` added to /demo/echo's (the upstream answers what it got).
fn echo_route_with(keys: &str, limits: &str) -> Tollgate {
    // The suite's own echo route gives way to this one (a second would never be reached).
    let echo = "[[routes]]\nmethod = \"POST\"\npath = \"/demo/echo\"\nupstream = \"demo\"\n\
                service = \"UNIVERSAL\"\nmethod_group = \"CONVERT\"\noperation = \"echo_payload\"\n";
    assert!(ROUTES.contains(echo));
    let routes = ROUTES.replace(echo, "");
    let extra = format!(
        r#"
[[routes]]
method = "POST"
path = "/demo/echo"
upstream = "demo"
service = "UNIVERSAL"
method_group = "CONVERT"
operation = "echo_payload"
{keys}
{routes}
{limits}
"#
    );
    Tollgate::start_with(Setup {
        extra,
        with_default_routes: false,
        ..Setup::default()
    })
}

#[test]
fn redacted_values_are_stored_masked_while_the_upstream_gets_the_real_ones() {
    let t = redacting_echo("");
    let alice = t.token("alice");
    let body = json!({"secret": "hunter2-plain", "auth": {"key": "k-9f8e7d"}, "keep": "visible"});
    let call = post(&t, "/demo/echo", &alice, &body);
    assert_eq!(call.status, 200);
    let echoed: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(
        echoed, body,
        "the upstream got the real values (it echoes what it got)"
    );

    for flow in ["INPUT", "OUTPUT"] {
        let stored = data_ok(&t, &alice, &call.code, &format!("data_flow_type={flow}"));
        let text = String::from_utf8_lossy(&stored);
        assert!(
            !text.contains("hunter2-plain") && !text.contains("k-9f8e7d"),
            "{flow} stored a secret: {text}"
        );
        let v: Value = serde_json::from_slice(&stored).unwrap();
        assert_eq!(v["secret"], "***", "{flow}");
        assert_eq!(v["auth"]["key"], "***", "{flow}");
        assert_eq!(
            v["keep"], "visible",
            "{flow}: only the named values are masked"
        );
    }
}

#[test]
fn redaction_keeps_the_rest_byte_for_byte_and_stores_no_unreadable_json() {
    let t = redacting_echo("");
    let alice = t.token("alice");
    let stored = |body: &[u8]| {
        let call = send(
            &t,
            reqwest::Method::POST,
            "/demo/echo",
            &alice,
            Some("application/json"),
            body,
            &[],
        );
        assert_eq!(call.status, 200);
        assert_eq!(call.body, body, "the upstream got the body as sent");
        let r = data(&t, &alice, &call.code, "data_flow_type=INPUT");
        assert_eq!(r.status(), 200);
        let truncated = header(&r, "x-capture-truncated");
        (
            r.bytes().unwrap().to_vec(),
            truncated.as_deref() == Some("true"),
        )
    };
    // Member order, numbers, escapes and spacing stay as sent; only the named value changes.
    let (body, cut) = stored(
        br#"{"z":1,"secret":"S","n":1.0,"big":123456789012345678901234567890,"s":"\u00e9\/"}"#,
    );
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"z":1,"secret":"***","n":1.0,"big":123456789012345678901234567890,"s":"\u00e9\/"}"#
    );
    assert!(!cut);
    // A byte order mark does not hide the body from redaction.
    let (body, _) = stored(b"\xEF\xBB\xBF{\"secret\":\"SECRET_BOM\"}");
    assert_eq!(body, b"\xEF\xBB\xBF{\"secret\":\"***\"}");
    // What cannot be read as JSON is not stored, and the capture says it was cut.
    let (body, cut) = stored(b"{\"secret\":\"A\"}\n{\"secret\":\"B\"}\n");
    assert_eq!(
        (body.as_slice(), cut),
        (&b"{\"secret\":\"***\"}\n"[..], true)
    );
    let (body, cut) = stored(b"{\"a\":1} and then some text");
    assert_eq!((body.as_slice(), cut), (&b"{\"a\":1} "[..], true));
    // Text that is not JSON at all is kept whole: there is nothing to point into.
    let (body, cut) = stored(b"secret=abc");
    assert_eq!((body.as_slice(), cut), (&b"secret=abc"[..], false));
    // Bytes that are not text (here JSON in UTF-16) may be JSON to the upstream and cannot be
    // masked: nothing of them is stored.
    let utf16: Vec<u8> = "\u{feff}{\"secret\":\"S16\"}"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let (body, cut) = stored(&utf16);
    assert_eq!((body.as_slice(), cut), (&b""[..], true));
}

#[test]
fn redaction_holds_when_the_capture_is_truncated() {
    let t = redacting_echo("\n[limits]\nmax_capture_bytes = 1000\n");
    let alice = t.token("alice");
    // The secret comes first, so it lies inside the captured first 1000 bytes.
    let body = format!(
        "{{\"secret\":\"hunter2-plain\",\"pad\":\"{}\"}}",
        "x".repeat(3000)
    );
    let call = send(
        &t,
        reqwest::Method::POST,
        "/demo/echo",
        &alice,
        Some("application/json"),
        body.as_bytes(),
        &[],
    );
    assert_eq!(call.status, 200);
    assert!(
        String::from_utf8_lossy(&call.body).contains("hunter2-plain"),
        "the upstream got the real value"
    );
    for flow in ["INPUT", "OUTPUT"] {
        let r = data(&t, &alice, &call.code, &format!("data_flow_type={flow}"));
        assert_eq!(r.status(), 200, "{flow}");
        assert_eq!(
            header(&r, "x-capture-truncated").as_deref(),
            Some("true"),
            "{flow}"
        );
        let text = String::from_utf8_lossy(&r.bytes().unwrap()).into_owned();
        assert!(
            !text.contains("hunter2-plain"),
            "{flow}: a truncated capture leaked the redacted value: {text:.80}"
        );
    }
}

#[test]
fn every_exchange_of_a_polled_process_is_on_record_even_when_polls_arrive_together() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let (start, path) = start_process(&t, &alice);
    let polls = 24;
    std::thread::scope(|s| {
        for _ in 0..polls {
            s.spawn(|| {
                let r = send(&t, reqwest::Method::GET, &path, &alice, None, b"", &[]);
                assert_eq!(r.status, 200);
            });
        }
    });
    assert_eq!(demo_count(&t, &path), polls);
    let page = audit(&t, &alice, &[("limit", "1000")]);
    assert_eq!(
        totals(&page),
        (polls + 1, polls + 1),
        "one audit record per exchange: {page}"
    );
    assert!(codes(&page).iter().all(|c| *c == start.code));
}

// ---------------------------------------------------------------- data errors and visibility

#[test]
fn captured_data_is_refused_on_bad_input_and_hidden_from_other_tenants() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let marker = "alice-only-marker-5150";
    let call = send(
        &t,
        reqwest::Method::POST,
        "/universal/plan/calculation",
        &alice,
        Some("application/json"),
        format!("{{\"locations\":[{{\"key\":\"{marker}\"}}]}}").as_bytes(),
        &[],
    );
    assert_eq!(call.status, 200);
    let code = call.code.clone();

    let r = data(&t, &alice, "not-a-uuid", "");
    assert_eq!(r.status(), 400, "a malformed tracecode is bad input");
    let body = json_of(r);
    assert_error_shape(&body, "ACCOUNT");
    assert!(
        body["message"].as_str().unwrap().contains("tracecode"),
        "{body}"
    );

    let unknown = uuid::Uuid::new_v4().to_string();
    let r = data(&t, &alice, &unknown, "");
    assert_eq!(r.status(), 404);
    let body = json_of(r);
    assert_eq!(body["resource_id"], unknown.as_str(), "{body}");
    assert_error_shape(&body, "ACCOUNT");

    for (who, flow) in [
        ("mallory", "INPUT"),
        ("mallory", "OUTPUT"),
        ("bob", "INPUT"),
    ] {
        let token = t.token(who);
        let r = data(&t, &token, &code, &format!("data_flow_type={flow}"));
        assert_eq!(r.status(), 404, "{who} must not see alice's {flow}");
        let text = r.text().unwrap();
        assert!(!text.contains(marker), "{who} got alice's bytes: {text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            body["resource_id"],
            code.as_str(),
            "the same 404 as an unknown code: {body}"
        );
        assert_error_shape(&body, "ACCOUNT");
    }
    let partner = t.token("paula");
    assert!(
        String::from_utf8_lossy(&data_ok(&t, &partner, &code, "")).contains(marker),
        "a PARTNER sees its company's"
    );
    let admin = t.token("root_admin");
    assert!(
        String::from_utf8_lossy(&data_ok(&t, &admin, &code, "")).contains(marker),
        "an ADMIN sees all"
    );
    // An ADMIN sees other companies' too.
    let mallory = t.token("mallory");
    let theirs = plan(&t, &mallory, &[7]);
    assert_eq!(
        data_ok(&t, &admin, &theirs.code, "data_flow_type=OUTPUT"),
        theirs.body
    );
    assert_eq!(
        data(&t, &partner, &theirs.code, "").status(),
        404,
        "paula (acme) must not see evil_corp's"
    );

    let r = data(&t, &alice, &code, "data_flow_stage=1");
    assert_eq!(r.status(), 404, "a sync call has no stage 1");
    assert_error_shape(&json_of(r), "ACCOUNT");
    for bad in [
        "data_flow_type=SIDEWAYS",
        "data_flow_type=input",
        "data_flow_stage=4",
        "data_flow_stage=-1",
        "data_flow_stage=x",
        "data_flow_convert=PDF",
    ] {
        let r = data(&t, &alice, &code, bad);
        assert_eq!(r.status(), 400, "{bad}");
        let body = json_of(r);
        assert_error_shape(&body, "ACCOUNT");
        let field = bad.split('=').next().unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{bad}: the message names the field: {body}"
        );
    }
    // A capture that is not JSON converts only as ORIGIN, and the answer says why.
    let words = send(
        &t,
        reqwest::Method::POST,
        "/demo/echo",
        &alice,
        Some("text/plain"),
        b"plain words",
        &[],
    );
    assert_eq!(data_ok(&t, &alice, &words.code, ""), b"plain words");
    for convert in ["JSON", "XLSX"] {
        let r = data(
            &t,
            &alice,
            &words.code,
            &format!("data_flow_convert={convert}"),
        );
        assert_eq!(r.status(), 400, "{convert}");
        let body = json_of(r);
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("data_flow_convert: the captured payload cannot be read as JSON (")
                && message.ends_with("); use ORIGIN"),
            "{convert}: {body}"
        );
    }
    let r = client()
        .get(t.url(&format!("/account/data/{code}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "no token, no data");
}

#[test]
fn a_stranger_cannot_follow_up_anothers_process_and_the_upstream_never_hears_of_it() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    let (start, path) = start_process(&t, &alice);
    let before = demo_count(&t, &path);
    assert_eq!(before, 0);

    let mallory = t.token("mallory");
    let paula = t.token("paula");
    for (who, token, method) in [
        ("mallory", &mallory, reqwest::Method::GET),
        ("mallory", &mallory, reqwest::Method::DELETE),
        ("paula", &paula, reqwest::Method::GET),
    ] {
        let r = client()
            .request(method.clone(), t.url(&path))
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(r.status(), 404, "{who} {method} of alice's process");
        let body = json_of(r);
        assert_eq!(body["resource_id"], start.code.as_str(), "{body}");
        assert_error_shape(&body, "UNIVERSAL");
    }
    assert_eq!(
        demo_count(&t, &path),
        before,
        "the upstream never got the strangers' calls"
    );
    assert_eq!(t.demo_stats()["requests"][&path], Value::Null);

    // Another spelling of the same UUID is not the process, even for its owner: the path
    // would reach the upstream in a spelling it never issued.
    for spelling in [start.code.to_uppercase(), start.code.replace('-', "")] {
        let other = path.replace(start.code.as_str(), &spelling);
        let r = send(&t, reqwest::Method::GET, &other, &alice, None, b"", &[]);
        assert_eq!(r.status, 404, "{other}");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_error_shape(&body, "UNIVERSAL");
        assert_eq!(t.demo_stats()["requests"][&other], Value::Null);
    }

    // The owner's own poll, refused before it is sent on (its body is over max_body_bytes),
    // takes no stage either.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {alice}\r\nContent-Length: 999999999999\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 512];
        let n = s.read(&mut head).unwrap();
        assert_eq!(status_of_raw(&head[..n]), 413);
    }

    // The owner still can, and the attempts refused took no stage.
    let own = send(&t, reqwest::Method::GET, &path, &alice, None, b"", &[]);
    assert_eq!(own.status, 200);
    assert_eq!(demo_count(&t, &path), 1);
    assert_eq!(
        data_ok(
            &t,
            &alice,
            &start.code,
            "data_flow_type=OUTPUT&data_flow_stage=1"
        ),
        own.body
    );
    assert_eq!(
        audit(&t, &mallory, &[])["actions"],
        json!([]),
        "nothing of it is on mallory's record"
    );
    let admin = t.token("root_admin");
    let by_admin = send(&t, reqwest::Method::GET, &path, &admin, None, b"", &[]);
    assert_eq!(by_admin.status, 200, "an ADMIN may touch any process");
    assert_eq!(demo_count(&t, &path), 2);

    // A HEAD asks after the process without being an exchange of it: it is answered, and
    // takes no stage (the next stage, 3, stays empty rather than holding its empty answer).
    let head = send(&t, reqwest::Method::HEAD, &path, &alice, None, b"", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(demo_count(&t, &path), 3);
    let r = data(
        &t,
        &alice,
        &start.code,
        "data_flow_type=OUTPUT&data_flow_stage=3",
    );
    assert_eq!(r.status(), 404, "a HEAD took a stage");
    assert_eq!(
        data_ok(
            &t,
            &alice,
            &start.code,
            "data_flow_type=OUTPUT&data_flow_stage=2"
        ),
        by_admin.body
    );
}

// ---------------------------------------------------------------- audit

/// A known mix of traffic: what each call was and when it was made.
struct Traffic {
    /// (code, username, service, operation, method_group, points) in call order.
    calls: Vec<(
        String,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        u64,
    )>,
    before: DateTime<Utc>,
    after: DateTime<Utc>,
}

fn traffic(t: &Tollgate) -> Traffic {
    let alice = t.token("alice");
    let bob = t.token("bob");
    let mallory = t.token("mallory");
    let before = Utc::now();
    let mut calls = Vec::new();
    let mut p = |who: &'static str, token: &str, n: usize| {
        let s = plan(t, token, &(0..n as i64).collect::<Vec<_>>());
        calls.push((
            s.code,
            who,
            "UNIVERSAL",
            "run_plan_calculation",
            "PLAN",
            n as u64,
        ));
    };
    p("alice", &alice, 3);
    p("alice", &alice, 1);
    p("bob", &bob, 4);
    p("mallory", &mallory, 2);
    p("alice", &alice, 5);
    let mut m = |who: &'static str, token: &str, n: usize| {
        let s = matrix(t, token, n);
        calls.push((
            s.code,
            who,
            "ROUTING",
            "run_matrix_calculation",
            "MATRIX",
            n as u64,
        ));
    };
    m("alice", &alice, 2);
    m("alice", &alice, 6);
    m("mallory", &mallory, 3);
    Traffic {
        calls,
        before,
        after: Utc::now(),
    }
}

impl Traffic {
    fn of(&self, who: &[&str]) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| who.contains(&c.1))
            .map(|c| c.0.clone())
            .collect()
    }
}

#[test]
fn audit_records_every_call_with_complete_tracedata() {
    let t = Tollgate::start();
    let traffic = traffic(&t);
    let alice = t.token("alice");
    let page = audit(&t, &alice, &[]);
    let actions = page["actions"].as_array().unwrap();
    assert_eq!(
        codes(&page),
        traffic.of(&["alice"]),
        "alice's calls in time order: {page}"
    );
    assert_eq!(totals(&page), (5, 5));
    for action in actions {
        let code = action["tracedata"]["code"].as_str().unwrap();
        let (_, who, service, operation, group, points) =
            traffic.calls.iter().find(|c| c.0 == code).unwrap();
        assert_eq!(action["username"], *who);
        assert_eq!(action["company_key"], "acme");
        assert_eq!(action["method_group"], *group);
        assert_eq!(action["statistics"]["points_count"], *points, "{action}");
        let td = &action["tracedata"];
        assert_eq!(td["client"], "acme_|_alice");
        assert_eq!(td["server"], "tollgate-test");
        assert_eq!(td["service"], *service);
        assert_eq!(td["operation"], *operation);
        let time = td["time"].as_str().unwrap();
        assert!(
            time.ends_with("+03:00"),
            "alice's time is in her offset: {time}"
        );
        let at = DateTime::parse_from_rfc3339(time)
            .unwrap()
            .with_timezone(&Utc);
        assert!(
            at >= traffic.before - chrono::Duration::seconds(1)
                && at <= traffic.after + chrono::Duration::seconds(1),
            "{time} is outside the calls' window"
        );
        let duration = action["statistics"]["duration"].as_str().unwrap();
        let secs = iso_seconds(duration);
        assert!((0.0..10.0).contains(&secs), "{duration}");
    }
    // A failed upstream call is on record too; a call refused before the upstream is not.
    let failed = send(
        &t,
        reqwest::Method::POST,
        "/universal/plan/calculation",
        &alice,
        Some("application/json"),
        br#"{"locations":[{"key":1}]}"#,
        &[("x-demo-status", "500")],
    );
    assert_eq!(failed.status, 500);
    let refused = send(
        &t,
        reqwest::Method::POST,
        "/universal/plan/calculation",
        &alice,
        Some("application/json"),
        b"{not json",
        &[],
    );
    assert_eq!(refused.status, 400);
    let page = audit(&t, &alice, &[]);
    let after = codes(&page);
    assert_eq!(after.len(), 6, "{page}");
    assert_eq!(after.last(), Some(&failed.code));
    assert!(!after.contains(&refused.code));
}

#[test]
fn calls_whose_upstream_failed_are_on_record_with_the_status_their_caller_got() {
    let hanging = FaultUpstream::start(Fault::Hang);
    let down = free_port();
    let t = Tollgate::start_extra(&failing_plan_routes(&[
        ("down", down),
        ("hanging", hanging.port),
    ]));
    let alice = t.token("alice");
    let body = br#"{"locations":[{"key":1},{"key":2}]}"#;
    let mut calls = Vec::new();
    for (name, status) in [("down", 502), ("hanging", 504)] {
        let seen = send(
            &t,
            reqwest::Method::POST,
            &format!("/universal/plan/{name}"),
            &alice,
            Some("application/json"),
            body,
            &[],
        );
        assert_eq!(seen.status, status, "{name}");
        calls.push((seen.code, status, name));
    }
    let ok = plan(&t, &alice, &[1]);
    assert_eq!(ok.status, 200);
    let page = audit(&t, &alice, &[]);
    let actions = page["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 3, "{page}");
    for (code, status, name) in &calls {
        let action = actions
            .iter()
            .find(|a| a["tracedata"]["code"] == code.as_str())
            .unwrap_or_else(|| panic!("the {name} call is not on record: {page}"));
        assert_eq!(action["status"], *status, "{action}");
        assert_eq!(action["tracedata"]["operation"], format!("run_plan_{name}"));
        assert_eq!(action["statistics"]["points_count"], 2);
        // What was sent is kept; nothing came back.
        assert_eq!(
            data_ok(&t, &alice, code, "data_flow_type=INPUT"),
            body.to_vec()
        );
        let output = data(&t, &alice, code, "data_flow_type=OUTPUT");
        assert_eq!(
            output.status(),
            404,
            "no output for the {name} call: {:?}",
            output.text()
        );
    }
    let answered = actions
        .iter()
        .find(|a| a["tracedata"]["code"] == ok.code.as_str())
        .unwrap();
    assert_eq!(answered["status"], 200);
}

#[test]
fn a_small_queue_with_a_long_flush_interval_admits_calls_and_records_them_all() {
    // The writer sleeps a minute between batches unless the queue wakes it.
    let t = start_with_config_edit(Setup::default(), |c| {
        c.replace(
            "flush_interval_ms = 20",
            "flush_interval_ms = 60000\nqueue_capacity = 16",
        )
    });
    let alice = t.token("alice");
    let mut answered = BTreeSet::new();
    for i in 0..40 {
        let seen = plan(&t, &alice, &[i]);
        assert_eq!(
            seen.status,
            200,
            "call {i} was refused while the writer idled: {}",
            String::from_utf8_lossy(&seen.body)
        );
        answered.insert(seen.code);
    }
    // Reading the audit flushes what is queued: every admitted call is on record.
    let page = audit(&t, &alice, &[("limit", "100")]);
    let recorded: BTreeSet<String> = codes(&page).into_iter().collect();
    assert!(answered.is_subset(&recorded), "{page}");
}

#[test]
fn audit_pages_filters_and_validates_its_parameters() {
    let t = Tollgate::start();
    let traffic = traffic(&t);
    let alice = t.token("alice");
    let all = traffic.of(&["alice"]);

    // Paging: pages of 2 put together are the whole list; totals never change with the page.
    let mut joined = Vec::new();
    for offset in [0, 2, 4, 6] {
        let page = audit(
            &t,
            &alice,
            &[("limit", "2"), ("offset", &offset.to_string())],
        );
        assert_eq!(totals(&page), (5, 5));
        joined.extend(codes(&page));
    }
    assert_eq!(joined, all);
    assert_eq!(codes(&audit(&t, &alice, &[("limit", "1")])), all[..1]);
    assert_eq!(
        codes(&audit(&t, &alice, &[("offset", "4"), ("limit", "100")])),
        all[4..]
    );
    let past = audit(&t, &alice, &[("offset", "50")]);
    assert_eq!(codes(&past), Vec::<String>::new());
    assert_eq!(totals(&past), (5, 5));
    // Paging in DESC order is the reverse.
    let mut desc = Vec::new();
    for offset in [0, 3] {
        desc.extend(codes(&audit(
            &t,
            &alice,
            &[
                ("limit", "3"),
                ("offset", &offset.to_string()),
                ("sort_direction", "DESC"),
            ],
        )));
    }
    assert_eq!(desc, all.iter().rev().cloned().collect::<Vec<_>>());

    // Filters: overall counts the visible window, filter what also passes.
    let routing: Vec<String> = traffic
        .calls
        .iter()
        .filter(|c| c.1 == "alice" && c.2 == "ROUTING")
        .map(|c| c.0.clone())
        .collect();
    let plan_codes: Vec<String> = traffic
        .calls
        .iter()
        .filter(|c| c.1 == "alice" && c.2 == "UNIVERSAL")
        .map(|c| c.0.clone())
        .collect();
    for (query, want) in [
        (vec![("service_name", "ROUTING")], routing.clone()),
        (vec![("service_name", "UNIVERSAL")], plan_codes.clone()),
        (vec![("method_group", "MATRIX")], routing.clone()),
        (
            vec![("operation_id", "run_plan_calculation")],
            plan_codes.clone(),
        ),
        (
            vec![
                ("service_name", "ROUTING"),
                ("method_group", "MATRIX"),
                ("operation_id", "run_matrix_calculation"),
            ],
            routing.clone(),
        ),
        (
            vec![("service_name", "UNIVERSAL"), ("method_group", "MATRIX")],
            vec![],
        ),
        (vec![("service_name", "PACKER")], vec![]),
        (vec![("operation_id", "run_nothing")], vec![]),
        (
            vec![("service_name", "ROUTING"), ("limit", "1"), ("offset", "1")],
            routing[1..].to_vec(),
        ),
    ] {
        let page = audit(&t, &alice, &query);
        let filtered = want.len() as u64;
        let (overall, filter) = totals(&page);
        assert_eq!(overall, 5, "{query:?}");
        if !query.iter().any(|(k, _)| *k == "limit") {
            assert_eq!(filter, filtered, "{query:?}");
            assert_eq!(codes(&page), want, "{query:?}");
        } else {
            assert_eq!(filter, 2, "{query:?}");
            assert_eq!(codes(&page), want, "{query:?}");
        }
    }

    for (query, field) in [
        (vec![("limit", "0")], "limit"),
        (vec![("limit", "10000001")], "limit"),
        (vec![("limit", "ten")], "limit"),
        (vec![("offset", "-1")], "offset"),
        (vec![("offset", "10000001")], "offset"),
        (vec![("sort_field", "colour")], "sort_field"),
        (vec![("sort_field", "")], "sort_field"),
        (vec![("sort_direction", "UP")], "sort_direction"),
        (vec![("service_name", "NOPE")], "service_name"),
        (vec![("service_name", "routing")], "service_name"),
        (vec![("method_group", "NOPE")], "method_group"),
        (vec![("operation_id", "ab")], "operation_id"),
        (vec![("from", "yesterday")], "from"),
        // Empty is no value, as for every other parameter: not the default.
        (vec![("from", "")], "from"),
        (vec![("to", "")], "to"),
        (vec![("to", "2025-13-01T00:00:00Z")], "to"),
        // Either order: no silent pick of one of two values.
        (
            vec![("offset", "0"), ("offset", "-1")],
            "offset: given more than once",
        ),
        (vec![("offset", "-1"), ("offset", "0")], "offset"),
        (
            vec![("sort_field", "time"), ("sort_field", "time")],
            "sort_field: given more than once",
        ),
    ] {
        let (status, body) = audit_status(&t, &alice, &query);
        assert_eq!(status, 400, "{query:?}: {body}");
        assert_error_shape(&body, "ACCOUNT");
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{query:?}: the message names {field}: {body}"
        );
    }
}

#[test]
fn audit_time_windows_accept_every_format_the_clients_send() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    // Call A answers 150 ms after it started, so a split 50 ms before its answer lies after
    // its start and before the start of call B.
    let before = Utc::now() - chrono::Duration::seconds(2);
    let a = send(
        &t,
        reqwest::Method::POST,
        "/universal/plan/calculation",
        &alice,
        Some("application/json"),
        br#"{"locations":[{"key":1}]}"#,
        &[("x-demo-delay-ms", "150")],
    );
    assert_eq!(a.status, 200);
    let split = Utc::now() - chrono::Duration::milliseconds(50);
    let b = plan(&t, &alice, &[1, 2]);
    let after = Utc::now() + chrono::Duration::seconds(2);
    let both = vec![a.code.clone(), b.code.clone()];

    let utc = FixedOffset::east_opt(0).unwrap();
    let msk = FixedOffset::east_opt(3 * 3600).unwrap();
    // (name, whether it has sub-second precision, the form)
    type Form = Box<dyn Fn(DateTime<Utc>) -> String>;
    let forms: Vec<(&str, bool, Form)> = vec![
        (
            "Z",
            false,
            Box::new(|t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        ),
        (
            "Z with millis",
            true,
            Box::new(|t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        ),
        (
            "+00:00",
            false,
            Box::new(move |t: DateTime<Utc>| {
                t.with_timezone(&utc)
                    .format("%Y-%m-%dT%H:%M:%S+00:00")
                    .to_string()
            }),
        ),
        (
            "+00:00 with millis",
            true,
            Box::new(move |t: DateTime<Utc>| {
                t.with_timezone(&utc)
                    .format("%Y-%m-%dT%H:%M:%S%.3f+00:00")
                    .to_string()
            }),
        ),
        (
            "+0000",
            false,
            Box::new(|t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S+0000").to_string()),
        ),
        (
            "+0000 with micros (the official client)",
            true,
            Box::new(|t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6f+0000").to_string()),
        ),
        (
            "+03:00",
            true,
            Box::new(move |t: DateTime<Utc>| {
                t.with_timezone(&msk)
                    .to_rfc3339_opts(SecondsFormat::Millis, false)
            }),
        ),
        (
            "+0300",
            true,
            Box::new(move |t: DateTime<Utc>| {
                t.with_timezone(&msk)
                    .format("%Y-%m-%dT%H:%M:%S%.3f%z")
                    .to_string()
            }),
        ),
        (
            "naive, alice's +3",
            false,
            Box::new(move |t: DateTime<Utc>| {
                t.with_timezone(&msk)
                    .format("%Y-%m-%dT%H:%M:%S")
                    .to_string()
            }),
        ),
        (
            "naive with micros, alice's +3",
            true,
            Box::new(move |t: DateTime<Utc>| {
                t.with_timezone(&msk)
                    .format("%Y-%m-%dT%H:%M:%S%.6f")
                    .to_string()
            }),
        ),
    ];
    for (name, precise, form) in &forms {
        let page = audit(&t, &alice, &[("from", &form(before)), ("to", &form(after))]);
        assert_eq!(codes(&page), both, "{name}: {page}");
        assert_eq!(totals(&page), (2, 2), "{name}");
        if !precise {
            continue;
        }
        let page = audit(&t, &alice, &[("from", &form(split)), ("to", &form(after))]);
        assert_eq!(
            codes(&page),
            vec![b.code.clone()],
            "{name}: from is where the window starts"
        );
        let page = audit(&t, &alice, &[("from", &form(before)), ("to", &form(split))]);
        assert_eq!(
            codes(&page),
            vec![a.code.clone()],
            "{name}: to is where it ends"
        );
        assert_eq!(totals(&page), (1, 1), "{name}");
    }
    // A literal '+' in the query string (decoded to a space by form rules) is still an offset.
    let raw = format!(
        "/account/audit?from={}&to={}",
        before.format("%Y-%m-%dT%H:%M:%S.000000+0000"),
        after.format("%Y-%m-%dT%H:%M:%S.000000+0000")
    );
    assert_eq!(codes(&json_of(t.get(&raw, &alice))), both, "{raw}");
    // A naive time is alice's wall clock: UTC wall-clock figures name a window 3 hours earlier.
    let naive_utc = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let page = audit(
        &t,
        &alice,
        &[("from", &naive_utc(before)), ("to", &naive_utc(after))],
    );
    assert_eq!(
        codes(&page),
        Vec::<String>::new(),
        "naive = the user's timezone, not UTC: {page}"
    );
    // The widest window anyone may ask for is answered, and quickly: its cost follows the
    // records in it, not the days it spans (walking 3.6 million days took a second of CPU
    // per request).
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let page = audit(
            &t,
            &alice,
            &[
                ("from", "0001-01-01T00:00:00Z"),
                ("to", "9999-12-31T23:59:59Z"),
            ],
        );
        assert_eq!(codes(&page), both);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "three ten-millennia windows took {took:?}"
    );
    // Defaults: from the start of alice's day until now.
    assert_eq!(codes(&audit(&t, &alice, &[])), both);
    assert_eq!(
        codes(&audit(&t, &alice, &[("from", &forms[0].2(before))])),
        both,
        "to defaults to now"
    );
    let page = audit(&t, &alice, &[("from", &forms[0].2(after))]);
    assert_eq!(totals(&page), (0, 0), "nothing after the calls");
}

#[test]
fn audit_sorts_by_every_field_in_both_directions() {
    let t = Tollgate::start();
    let traffic = traffic(&t);
    let admin = t.token("root_admin");
    let all: Vec<String> = traffic.calls.iter().map(|c| c.0.clone()).collect();
    let default = audit(&t, &admin, &[]);
    assert_eq!(codes(&default), all, "default: time ASC");
    assert_eq!(codes(&audit(&t, &admin, &[("sort_field", "time")])), all);
    assert_eq!(
        codes(&audit(
            &t,
            &admin,
            &[("sort_field", "time"), ("sort_direction", "DESC")]
        )),
        all.iter().rev().cloned().collect::<Vec<_>>()
    );

    type Key = fn(&Value) -> String;
    let fields: [(&str, Key); 6] = [
        ("username", |a| a["username"].as_str().unwrap().to_string()),
        ("service", |a| {
            a["tracedata"]["service"].as_str().unwrap().to_string()
        }),
        ("operation", |a| {
            a["tracedata"]["operation"].as_str().unwrap().to_string()
        }),
        ("method_group", |a| {
            a["method_group"].as_str().unwrap().to_string()
        }),
        ("points_count", |a| {
            format!("{:010}", a["statistics"]["points_count"].as_u64().unwrap())
        }),
        ("duration", |a| {
            format!(
                "{:015.3}",
                iso_seconds(a["statistics"]["duration"].as_str().unwrap())
            )
        }),
    ];
    for (field, key) in fields {
        for direction in ["ASC", "DESC"] {
            let page = audit(
                &t,
                &admin,
                &[("sort_field", field), ("sort_direction", direction)],
            );
            assert_eq!(totals(&page), (8, 8));
            let keys: Vec<String> = page["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(key)
                .collect();
            let mut sorted = keys.clone();
            sorted.sort();
            if direction == "DESC" {
                sorted.reverse();
            }
            assert_eq!(keys, sorted, "sort_field={field} {direction}");
            let mut got = codes(&page);
            got.sort();
            let mut want = all.clone();
            want.sort();
            assert_eq!(
                got, want,
                "sort_field={field} {direction} lists every record once"
            );
        }
    }
    // Sorted pages: the first 3 by points DESC are the 3 largest calls.
    let page = audit(
        &t,
        &admin,
        &[
            ("sort_field", "points_count"),
            ("sort_direction", "DESC"),
            ("limit", "3"),
        ],
    );
    let points: Vec<u64> = page["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["statistics"]["points_count"].as_u64().unwrap())
        .collect();
    assert_eq!(points, vec![6, 5, 4]);
    let page = audit(
        &t,
        &admin,
        &[
            ("sort_field", "points_count"),
            ("limit", "2"),
            ("offset", "1"),
        ],
    );
    let points: Vec<u64> = page["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["statistics"]["points_count"].as_u64().unwrap())
        .collect();
    assert_eq!(points, vec![2, 2]);
    // Lower case direction is taken, anything else is not.
    assert_eq!(
        audit_status(&t, &admin, &[("sort_direction", "desc")]).0,
        200
    );
    assert_eq!(audit_status(&t, &admin, &[("sort_field", "TIME")]).0, 400);
    assert_eq!(
        audit_status(&t, &admin, &[("sort_field", "password_hash")]).0,
        400
    );
}

#[test]
fn audit_visibility_follows_the_role() {
    let t = Tollgate::start();
    let traffic = traffic(&t);
    for (who, sees) in [
        ("alice", vec!["alice"]),
        ("bob", vec!["bob"]),
        ("mallory", vec!["mallory"]),
        ("paula", vec!["alice", "bob"]),
        ("root_admin", vec!["alice", "bob", "mallory"]),
    ] {
        let token = t.token(who);
        let page = audit(&t, &token, &[]);
        let want = traffic.of(&sees);
        assert_eq!(codes(&page), want, "{who} sees the calls of {sees:?}");
        assert_eq!(
            totals(&page),
            (want.len() as u64, want.len() as u64),
            "{who}"
        );
        // Filters narrow within what one may see, never beyond it.
        let page = audit(&t, &token, &[("service_name", "ROUTING")]);
        let want_routing: Vec<String> = traffic
            .calls
            .iter()
            .filter(|c| sees.contains(&c.1) && c.2 == "ROUTING")
            .map(|c| c.0.clone())
            .collect();
        assert_eq!(codes(&page), want_routing, "{who}");
        assert_eq!(
            totals(&page),
            (want.len() as u64, want_routing.len() as u64),
            "{who}"
        );
        let names: BTreeSet<&str> = page["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["username"].as_str().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| sees.contains(n)),
            "{who} saw {names:?}"
        );
    }
    // bob (acme, tz 0) sees times in his own offset, alice's records show hers to paula.
    let paula = t.token("paula");
    for a in audit(&t, &paula, &[])["actions"].as_array().unwrap() {
        let time = a["tracedata"]["time"].as_str().unwrap();
        match a["username"].as_str().unwrap() {
            "alice" => assert!(time.ends_with("+03:00"), "{time}"),
            "bob" => assert!(time.ends_with("+00:00") || time.ends_with('Z'), "{time}"),
            other => panic!("paula saw {other}'s record"),
        }
    }
    let r = client().get(t.url("/account/audit")).send().unwrap();
    assert_eq!(r.status(), 401);
}

// ---------------------------------------------------------------- statistics and report

/// alice: PLAN 3 points (2 unique) + 2 points (2 unique), MATRIX 4 points, one failed call.
fn stats_traffic(t: &Tollgate, alice: &str) {
    plan(t, alice, &[1, 1, 2]);
    plan(t, alice, &[5, 6]);
    matrix(t, alice, 4);
    let failed = send(
        t,
        reqwest::Method::POST,
        "/universal/plan/calculation",
        alice,
        Some("application/json"),
        br#"{"locations":[{"key":1},{"key":2},{"key":3},{"key":4},{"key":5},{"key":6},{"key":7}]}"#,
        &[("x-demo-status", "503")],
    );
    assert_eq!(failed.status, 503);
}

#[test]
fn statistics_count_points_per_day_service_and_method_group_live() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    stats_traffic(&t, &alice);
    let today = today_at(3).to_string();
    let want: BTreeMap<(String, String, String), (u64, u64)> = [
        (
            (today.clone(), "UNIVERSAL".to_string(), "PLAN".to_string()),
            (5, 4),
        ),
        (
            (today.clone(), "ROUTING".to_string(), "MATRIX".to_string()),
            (4, 4),
        ),
    ]
    .into_iter()
    .collect();

    // Right after the calls, with no wait: the proxy counts live.
    let (status, body) = stats(&t, &alice, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["username"], "alice");
    assert_eq!(
        stats_table(&body),
        want,
        "defaults (month to date) hold today; failed calls cost nothing: {body}"
    );
    assert_eq!(
        stats_table(&stats(&t, &alice, &format!("from={today}&to={today}")).1),
        want,
        "from and to are inclusive"
    );
    let d = |days: i64| (today_at(3) + chrono::Duration::days(days)).to_string();
    assert_eq!(
        stats_table(&stats(&t, &alice, &format!("from={}&to={}", d(-1), d(1))).1),
        want
    );
    assert_eq!(
        stats_table(&stats(&t, &alice, &format!("from={}", d(-40))).1),
        want,
        "to defaults to today"
    );
    assert_eq!(
        stats(&t, &alice, &format!("from={}&to={}", d(1), d(2))).1["dates"],
        json!([]),
        "nothing tomorrow"
    );
    assert_eq!(
        stats(&t, &alice, &format!("from={}&to={}", d(-3), d(-1))).1["dates"],
        json!([]),
        "nothing before today"
    );

    // Another call shows at once.
    plan(&t, &alice, &[9]);
    let mut more = want.clone();
    more.insert((today.clone(), "UNIVERSAL".into(), "PLAN".into()), (6, 5));
    assert_eq!(stats_table(&stats(&t, &alice, "").1), more);

    // Each user sees their own.
    let bob = t.token("bob");
    let (status, body) = stats(&t, &bob, "");
    assert_eq!(status, 200);
    assert_eq!(body["username"], "bob");
    assert_eq!(body["dates"], json!([]));

    // With `username`, a role that sees an account's audit sees its statistics: its company's
    // PARTNER and any ADMIN; anyone else gets the 404 an unknown name gets.
    for viewer in ["paula", "root_admin"] {
        let token = t.token(viewer);
        let (status, body) = stats(&t, &token, "username=alice");
        assert_eq!(status, 200, "{viewer}: {body}");
        assert_eq!(body["username"], "alice");
        assert_eq!(stats_table(&body), more, "{viewer} sees alice's");
        let r = t.get("/account/report?username=alice", &token);
        assert_eq!(r.status(), 200, "{viewer}'s report of alice");
        let disposition = header(&r, "content-disposition").unwrap();
        assert!(disposition.contains("report_alice_"), "{disposition}");
    }
    let mallory = t.token("mallory");
    for (token, name) in [
        (&bob, "alice"),
        (&mallory, "alice"),
        (&bob, "nobody_at_all"),
    ] {
        let (status, body) = stats(&t, token, &format!("username={name}"));
        assert_eq!(status, 404, "{name}: {body}");
        assert_eq!(body["resource_id"], name, "{body}");
        assert_eq!(
            t.get(&format!("/account/report?username={name}"), token)
                .status(),
            404
        );
    }
    assert_eq!(stats(&t, &bob, "username=bob").1["username"], "bob");

    // The longest period is 3653 days.
    let from = today_at(3) - chrono::Duration::days(3652);
    assert_eq!(
        stats(&t, &alice, &format!("from={from}&to={today}")).0,
        200,
        "3653 days is allowed"
    );
    for (query, field) in [
        (
            format!("from={}&to={today}", from - chrono::Duration::days(1)),
            "to",
        ),
        (format!("from={}&to={}", d(0), d(-1)), "to"),
        // With `to` left out, `from` is what is wrong.
        (
            format!("from={}", today_at(3) + chrono::Duration::days(5)),
            "from: must not be after to, which is today",
        ),
        ("from=2025-02-30".to_string(), "from"),
        ("from=today".to_string(), "from"),
        ("to=2025-1-5x".to_string(), "to"),
        ("from=2025-01-01T00:00:00Z".to_string(), "from"),
        ("from=2025-1-1".to_string(), "from"),
        ("from=%2B2025-01-01".to_string(), "from"),
        ("from=0000-01-01&to=0000-01-02".to_string(), "from"),
        (
            format!("from={today}&from={today}"),
            "from: given more than once",
        ),
    ] {
        let (status, body) = stats(&t, &alice, &query);
        assert_eq!(status, 400, "{query}: {body}");
        assert_error_shape(&body, "ACCOUNT");
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{query}: {body}"
        );
    }
    assert_eq!(t.get("/account/statistics", "not-a-token").status(), 401);

    // A removed account's statistics stay under its name, for an ADMIN (its company is no
    // longer known, so its former PARTNER gets the 404 of an unknown name).
    let out = t.user_cli(&["remove", "alice"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = t.token("root_admin");
    let (status, body) = stats(&t, &admin, "username=alice");
    assert_eq!(status, 200, "{body}");
    assert_eq!(stats_table(&body), more, "the removed account's statistics");
    assert_eq!(
        t.get("/account/report?username=alice", &admin).status(),
        200
    );
    assert_eq!(stats(&t, &t.token("paula"), "username=alice").0, 404);
}

fn put_info(t: &Tollgate, token: &str, username: &str, company: &str, timezone: i32) {
    let r = client()
        .put(t.url("/account/info"))
        .bearer_auth(token)
        .json(&json!({"username": username, "company_key": company, "timezone": timezone}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
}

#[test]
fn a_partner_sees_a_moved_users_statistics_from_the_day_after_it_joined() {
    let t = Tollgate::start();
    let bob = t.token("bob");
    let admin = t.token("root_admin");
    let wide = {
        let today = Utc::now().date_naive();
        format!(
            "username=bob&from={}&to={}",
            today - chrono::Duration::days(3),
            today + chrono::Duration::days(3)
        )
    };
    let dates = |body: &Value| -> Vec<String> {
        body["dates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["date"].as_str().unwrap().to_string())
            .collect()
    };
    // bob calls under acme at UTC-12, and moves to evil_corp that same local day.
    put_info(&t, &bob, "bob", "acme", -12);
    plan(&t, &bob, &[1]);
    put_info(&t, &admin, "bob", "evil_corp", -12);
    let out = t.user_cli(
        &[
            "add",
            "pete",
            "--company",
            "evil_corp",
            "--roles",
            "PARTNER",
            "--password",
            "pete-password-1",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pete = t.token_for("pete", "pete-password-1");
    let (status, body) = stats(&t, &pete, &wide);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        dates(&body),
        Vec::<String>::new(),
        "the move's day holds acme's calls: not evil_corp's to see"
    );
    // A timezone set after the move does not open earlier days.
    put_info(&t, &admin, "bob", "evil_corp", 12);
    assert_eq!(dates(&stats(&t, &pete, &wide).1), Vec::<String>::new());
    // At UTC+12 bob is on the next local date: wholly evil_corp's, and shown.
    plan(&t, &bob, &[1, 2]);
    let all = dates(&stats(&t, &admin, &wide).1);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(dates(&stats(&t, &pete, &wide).1), all[1..]);
    // bob sees all of it; acme's PARTNER no longer sees bob.
    assert_eq!(
        dates(&stats(&t, &bob, &wide.replace("username=bob&", "")).1),
        all
    );
    assert_eq!(stats(&t, &t.token("paula"), &wide).0, 404);
}

#[test]
fn points_beyond_the_apis_bound_are_shown_as_the_bound_and_reported_whole() {
    // Where no quota limits them, one call can count more points than the API's audit and
    // statistics can say (0..10000000, which its clients enforce): those answers show the
    // bound, and the report's workbook the whole count.
    let t = Tollgate::start_with(Setup {
        extra: r#"
[[routes]]
method = "POST"
path = "/demo/echo"
upstream = "demo"
service = "ROUTING"
method_group = "MATRIX"
operation = "echo_payload"
points = ["/items"]
capture = false
"#
        .into(),
        with_default_routes: false,
        ..Setup::default()
    });
    let alice = t.token("alice");
    let n = 10_000_001;
    let mut body = Vec::with_capacity(2 * n + 16);
    body.extend_from_slice(b"{\"items\":[0");
    for _ in 1..n {
        body.extend_from_slice(b",0");
    }
    body.extend_from_slice(b"]}");
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // The record is made before the answer ends: read it to its end.
    assert_eq!(r.bytes().unwrap().len(), 2 * n + 11);
    let page = audit(&t, &alice, &[]);
    assert_eq!(
        page["actions"][0]["statistics"]["points_count"], 10_000_000,
        "{page}"
    );
    let today = today_at(3);
    let (status, body) = stats(&t, &alice, "");
    assert_eq!(status, 200, "{body}");
    let key = (
        today.to_string(),
        "ROUTING".to_string(),
        "MATRIX".to_string(),
    );
    assert_eq!(
        stats_table(&body),
        BTreeMap::from([(key, (10_000_000, 1))]),
        "{body}"
    );
    let r = t.get(&format!("/account/report?from={today}&to={today}"), &alice);
    assert_eq!(r.status(), 200);
    let daily = rows(&mut workbook(r.bytes().unwrap().to_vec()), "Daily");
    assert_eq!(daily.len(), 2, "{daily:?}");
    assert_eq!(
        (number(&daily[1][3]), number(&daily[1][4])),
        (10_000_001.0, 1.0),
        "{daily:?}"
    );
}

#[test]
fn the_report_is_a_workbook_whose_daily_sheet_matches_the_statistics() {
    let t = Tollgate::start();
    let alice = t.token("alice");
    stats_traffic(&t, &alice);
    let today = today_at(3);
    let from = today - chrono::Duration::days(5);
    let query = format!("from={from}&to={today}");
    let statistics = stats_table(&stats(&t, &alice, &query).1);

    let r = client()
        .get(t.url(&format!("/account/report?{query}")))
        .bearer_auth(&alice)
        .header("accept", "application/json")
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a client asking for JSON still gets the file"
    );
    let disposition = header(&r, "content-disposition").expect("Content-Disposition");
    let want_name = format!(
        "report_alice_{}_{}.xlsx",
        from.format("%Y%m%d"),
        today.format("%Y%m%d")
    );
    assert!(
        disposition.starts_with("attachment")
            && disposition.contains(&format!("filename=\"{want_name}\"")),
        "{disposition}"
    );
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/octet-stream")
    );
    let mut wb = workbook(r.bytes().unwrap().to_vec());
    let names = wb.sheet_names();
    assert!(
        names.iter().any(|n| n == "Daily") && names.iter().any(|n| n == "Totals"),
        "{names:?}"
    );
    // Excel holds no dates before 1900: a report starting earlier is refused, naming `from`.
    let r = t.get("/account/report?from=1899-12-31&to=1900-03-05", &alice);
    assert_eq!(r.status(), 400);
    let err: Value = r.json().unwrap();
    assert!(
        err["message"].as_str().unwrap().starts_with("from: "),
        "{err}"
    );
    assert_eq!(
        t.get("/account/report?from=1900-03-01&to=1900-03-05", &alice)
            .status(),
        200
    );

    let daily = rows(&mut wb, "Daily");
    assert_eq!(
        daily[0].iter().map(text).collect::<Vec<_>>(),
        ["date", "service", "method_group", "points", "unique_points"]
    );
    let mut from_sheet = BTreeMap::new();
    for row in &daily[1..] {
        let date = date_cell(&row[0]);
        from_sheet.insert(
            (date.to_string(), text(&row[1]), text(&row[2])),
            (number(&row[3]) as u64, number(&row[4]) as u64),
        );
    }
    assert_eq!(
        from_sheet, statistics,
        "the Daily sheet is the statistics, row for row"
    );
    assert_eq!(daily.len() - 1, statistics.len());

    let totals = rows(&mut wb, "Totals");
    let cell = |label: &str| -> Vec<Data> {
        totals
            .iter()
            .find(|r| r.first().map(text).as_deref() == Some(label))
            .unwrap_or_else(|| panic!("no {label} row in {totals:?}"))
            .clone()
    };
    assert_eq!(text(&cell("user")[1]), "alice");
    assert_eq!(date_cell(&cell("from")[1]), from);
    assert_eq!(date_cell(&cell("to")[1]), today);
    let total = cell("Total");
    assert_eq!(
        (number(&total[2]), number(&total[3])),
        (9.0, 8.0),
        "grand total of points and unique points"
    );
    let plan_row = totals
        .iter()
        .find(|r| r.len() > 3 && text(&r[0]) == "UNIVERSAL" && text(&r[1]) == "PLAN")
        .expect("a UNIVERSAL PLAN row");
    assert_eq!((number(&plan_row[2]), number(&plan_row[3])), (5.0, 4.0));

    // An empty period still gives a workbook; bad periods are refused like the statistics'.
    let r = t.get(
        &format!(
            "/account/report?from={}&to={}",
            today - chrono::Duration::days(9),
            today - chrono::Duration::days(8)
        ),
        &alice,
    );
    assert_eq!(r.status(), 200);
    let mut empty = workbook(r.bytes().unwrap().to_vec());
    assert_eq!(rows(&mut empty, "Daily").len(), 1, "only the header");
    let r = t.get(
        &format!(
            "/account/report?from={today}&to={}",
            today - chrono::Duration::days(1)
        ),
        &alice,
    );
    assert_eq!(r.status(), 400);
    assert_error_shape(&json_of(r), "ACCOUNT");
}

// ---------------------------------------------------------------- documentation files

#[test]
fn a_link_in_the_docs_folder_is_served_only_when_it_stays_inside() {
    let root = tempfile::tempdir().unwrap();
    let docs = root.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("guide_en.html"), "<html>guide</html>").unwrap();
    // What else an operator leaves in the folder is not documentation, and stays private.
    std::fs::write(docs.join("signing-key"), "private").unwrap();
    std::fs::write(docs.join("tollgate.toml"), "private").unwrap();
    std::fs::write(root.path().join("beside.html"), "<html>private</html>").unwrap();
    std::os::unix::fs::symlink("guide_en.html", docs.join("alias_en.html")).unwrap();
    std::os::unix::fs::symlink("../beside.html", docs.join("beside.html")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", docs.join("hostname.html")).unwrap();
    let dir = docs.display().to_string();
    let t = start_with_config_edit(Setup::default(), |c| {
        let start = c.find("[docs]\ndir = \"").unwrap() + "[docs]\ndir = \"".len();
        let end = start + c[start..].find('"').unwrap();
        format!("{}{dir}{}", &c[..start], &c[end..])
    });
    let get = |name: &str| {
        let r = client()
            .get(t.url(&format!("/account/file/{name}")))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    assert_eq!(
        get("guide_en.html"),
        (200, "<html>guide</html>".to_string())
    );
    assert_eq!(
        get("alias_en.html"),
        (200, "<html>guide</html>".to_string())
    );
    for outside in [
        "beside.html",
        "hostname.html",
        "signing-key",
        "tollgate.toml",
    ] {
        let (status, body) = get(outside);
        assert_eq!(status, 404, "{outside}: {body}");
        assert!(!body.contains("private"), "{outside}: {body}");
    }
}

#[test]
fn documentation_files_are_served_and_nothing_beside_them() {
    let t = Tollgate::start();
    let r = client()
        .get(t.url("/account/file/file_en.html"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").unwrap().starts_with("text/html"));
    assert!(r.text().unwrap().contains("<html"), "the page itself");
    let r = client()
        .get(t.url("/account/file/file_en.html"))
        .header("accept", "application/json")
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a client asking for JSON still gets the file"
    );
    assert!(header(&r, "content-type").unwrap().starts_with("text/html"));

    for name in [
        "a.htm",
        "abcde",
        "x",
        "no_such_file.html",
        &format!("{}.html", "a".repeat(124)),
    ] {
        let r = client()
            .get(t.url(&format!("/account/file/{name}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 404, "{name}");
        let body = json_of(r);
        assert_eq!(body["resource_id"], name, "{body}");
        assert_error_shape(&body, "ACCOUNT");
    }
    // Each of these would name a real file outside the docs folder (or the page by a detour).
    for path in [
        "/account/file/../Cargo.toml",
        "/account/file/../../main/Cargo.toml",
        "/account/file/../docs/file_en.html",
        "/account/file/%2e%2e%2fCargo.toml",
        "/account/file/%2E%2E%2FCargo.toml",
        "/account/file/..%2FCargo.toml",
        "/account/file/..%2fsrc%2fmain.rs",
        "/account/file/%2e%2e/Cargo.toml",
        "/account/file/..%5cCargo.toml",
        "/account/file/..%5c..%5cCargo.toml",
        "/account/file/%252e%252e%252fCargo.toml",
        "/account/file/..%252fCargo.toml",
        "/account/file/%2fetc%2fpasswd",
        "/account/file//etc/passwd",
        "/account/file/sub/../file_en.html",
        "/account/file/file_en.html%00.txt",
        "/account/file/.%2e/Cargo.toml",
    ] {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let response = raw_exchange(t.port, request.as_bytes(), Duration::from_secs(5));
        let text = String::from_utf8_lossy(&response);
        assert_eq!(status_of_raw(&response), 404, "{path}: {text}");
        assert!(
            !text.contains("[package]") && !text.contains("root:") && !text.contains("fn main"),
            "{path} leaked a file"
        );
    }
}

/// The status of an empty plan call: 200 when the call is taken.
fn empty_plan(t: &Tollgate, token: &str) -> u16 {
    t.post_json(
        "/universal/plan/calculation",
        token,
        &json!({"locations": []}),
    )
    .status()
    .as_u16()
}

fn health(t: &Tollgate) -> f64 {
    t.get("/account/system/check", "").json::<Value>().unwrap()["health"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_store_that_cannot_be_written_refuses_calls_says_so_and_recovers_with_nothing_lost() {
    let mut t = Tollgate::start();
    let alice = t.token("alice");
    assert_eq!(health(&t), 1.0);
    // The captured bodies' folder made unusable: the next batch with a body fails.
    let payloads = t.dir.path().join("store").join("payloads");
    std::fs::remove_dir_all(&payloads).unwrap();
    std::fs::write(&payloads, b"in the way").unwrap();
    // Answered (buffered durability): its record waits in the writer's queue.
    let r = t.post_json(
        "/universal/plan/calculation",
        &alice,
        &json!({"locations": [{"key": "a"}]}),
    );
    assert_eq!(r.status(), 200);
    let kept = header(&r, "x-tracecode").unwrap();
    // Once the batch fails, calls are refused rather than answered off the record, with a
    // token or without, and health says the store is failing.
    assert!(
        eventually(Duration::from_secs(5), || health(&t) < 1.0),
        "health stays 1 while the store fails"
    );
    for r in [
        t.post_json(
            "/universal/plan/calculation",
            &alice,
            &json!({"locations": []}),
        ),
        t.get("/universal/system/version", ""),
    ] {
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        assert_error_shape(&r.json::<Value>().unwrap(), "UNIVERSAL");
    }
    // A read that needs the latest calls says they are not on record, at once.
    let started = std::time::Instant::now();
    assert_eq!(t.get("/account/audit", &alice).status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The folder back: the writer's next try succeeds, and nothing answered is missing.
    std::fs::remove_file(&payloads).unwrap();
    std::fs::create_dir(&payloads).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || health(&t) == 1.0),
        "the store never recovered"
    );
    let audit = t.get("/account/audit", &alice).json::<Value>().unwrap();
    let codes: Vec<&str> = audit["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["tracedata"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, [kept.as_str()], "{audit}");
    let input = data_ok(
        &t,
        &alice,
        &kept,
        "data_flow_type=INPUT&data_flow_stage=0&data_flow_convert=ORIGIN",
    );
    assert_eq!(input, br#"{"locations":[{"key":"a"}]}"#);
    assert_eq!(empty_plan(&t, &alice), 200);
    assert_eq!(t.terminate(), Some(0));
}

#[test]
fn with_strict_durability_a_call_whose_record_cannot_be_written_does_not_end_as_answered() {
    let mut t = start_with_config_edit(Setup::default(), |config| {
        config.replace(
            "flush_interval_ms = 20",
            "flush_interval_ms = 20\ndurability = \"strict\"",
        )
    });
    let alice = t.token("alice");
    let payloads = t.dir.path().join("store").join("payloads");
    std::fs::remove_dir_all(&payloads).unwrap();
    std::fs::write(&payloads, b"in the way").unwrap();
    // Its record cannot be made durable: the answer is cut off, at once, not held without end.
    let started = std::time::Instant::now();
    let answered = client()
        .post(t.url("/universal/plan/calculation"))
        .bearer_auth(&alice)
        .json(&json!({"locations": [{"key": "a"}]}))
        .send()
        .and_then(|r| r.bytes());
    assert!(answered.is_err(), "answered as if on record: {answered:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(empty_plan(&t, &alice), 503);
    // The record was kept for the writer's next try, which succeeds once the folder is back.
    std::fs::remove_file(&payloads).unwrap();
    std::fs::create_dir(&payloads).unwrap();
    assert!(eventually(Duration::from_secs(5), || health(&t) == 1.0));
    let audit = t.get("/account/audit", &alice).json::<Value>().unwrap();
    assert_eq!(audit["actions"].as_array().unwrap().len(), 1, "{audit}");
    assert_eq!(t.terminate(), Some(0));
}

#[test]
fn a_caller_that_stops_taking_a_download_loses_its_connection_after_the_client_timeout() {
    let t = start_with_config_edit(Setup::default(), |config| {
        format!("{config}\n[limits]\nmax_capture_bytes = 33554432\nclient_read_timeout_ms = 1000\n")
    });
    let alice = t.token("alice");
    // 24 MiB captured: more than the kernel buffers of both ends hold.
    let body = vec![b'x'; 24 << 20];
    let r = client()
        .post(t.url("/demo/echo"))
        .bearer_auth(&alice)
        .body(body.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let code = header(&r, "x-tracecode").unwrap();
    assert_eq!(r.bytes().unwrap().len(), body.len());

    let mut caller = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    std::io::Write::write_all(
        &mut caller,
        format!(
            "GET /account/data/{code}?data_flow_type=INPUT&data_flow_stage=0&data_flow_convert=ORIGIN HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    // It reads nothing for a while: the answer's writes wait, then give up.
    std::thread::sleep(Duration::from_secs(3));
    let received = read_until_closed(&mut caller, Duration::from_secs(10));
    assert!(received < body.len(), "{received} bytes");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Posts `coded` to /demo/echo as gzip-coded JSON.
fn post_gzip(t: &Tollgate, token: &str, coded: &[u8]) -> Seen {
    let headers = [("content-encoding", "gzip")];
    let json = Some("application/json");
    send(
        t,
        reqwest::Method::POST,
        "/demo/echo",
        token,
        json,
        coded,
        &headers,
    )
}

/// The suite's routes, with /demo/echo counting points: the upstream answers what it got.
fn counting_echo(limits: &str) -> Tollgate {
    echo_route_with("points = [\"/locations\"]\nunique_key = \"/key\"", limits)
}

#[test]
fn gzip_bodies_are_counted_decoded_forwarded_as_sent_and_readable_from_the_record() {
    let t = counting_echo("");
    let alice = t.token("alice");
    let plain = br#"{"locations":[{"key":"a"},{"key":"b"},{"key":"a"}]}"#;
    let coded = gzip(plain);
    let call = post_gzip(&t, &alice, &coded);
    assert_eq!(call.status, 200);
    assert_eq!(call.body, coded, "the upstream got the coded bytes as sent");

    // Counted as the same body sent plain would be.
    let page = audit(&t, &alice, &[]);
    let action = page["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["tracedata"]["code"] == call.code.as_str())
        .unwrap_or_else(|| panic!("the call is not on record: {page}"))
        .clone();
    assert_eq!(action["statistics"]["points_count"], 3, "{action}");

    for flow in ["INPUT", "OUTPUT"] {
        // ORIGIN: the bytes as sent, with the coding that reads them.
        let r = data(&t, &alice, &call.code, &format!("data_flow_type={flow}"));
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "content-encoding").as_deref(),
            Some("gzip"),
            "{flow}"
        );
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(r.bytes().unwrap().to_vec(), coded, "{flow}");
        // A caller that takes no coding gets the same bytes as opaque ones, the coding named.
        let r = client()
            .get(t.url(&format!(
                "/account/data/{}?data_flow_type={flow}",
                call.code
            )))
            .bearer_auth(&alice)
            .header("accept-encoding", "identity")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-encoding"), None, "{flow}");
        assert_eq!(
            header(&r, "x-capture-content-encoding").as_deref(),
            Some("gzip")
        );
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(r.bytes().unwrap().to_vec(), coded, "{flow}");
        let converted = |to: &str| {
            let query = format!("data_flow_type={flow}&data_flow_convert={to}");
            let r = data(&t, &alice, &call.code, &query);
            assert_eq!(r.status(), 200, "{flow} as {to}");
            r
        };
        // JSON: the payload itself.
        let r = converted("JSON");
        assert_eq!(header(&r, "content-encoding"), None, "{flow}");
        assert_eq!(r.bytes().unwrap().as_ref(), plain, "{flow}");
        // XLSX: one row per location.
        let r = converted("XLSX");
        let mut book: Xlsx<_> =
            open_workbook_from_rs(Cursor::new(r.bytes().unwrap().to_vec())).unwrap();
        let sheet = book.worksheet_range("locations").unwrap();
        assert_eq!(
            sheet.height(),
            4,
            "{flow}: a header row and three locations"
        );
    }
}

#[test]
fn coded_bodies_that_cannot_be_counted_are_refused_and_never_forwarded() {
    let t = counting_echo("[limits]\nmax_body_bytes = 1048576\n");
    let alice = t.token("alice");
    let echoed = || {
        t.demo_stats()["requests"]["/demo/echo"]
            .as_u64()
            .unwrap_or(0)
    };
    let body = br#"{"locations":[{"key":"a"}]}"#;
    let refused = |coded: &[u8], coding: &str| {
        let r = client()
            .post(t.url("/demo/echo"))
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(coded.to_vec())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let accept = header(&r, "accept-encoding");
        let body = json_of(r);
        assert_error_shape(&body, "UNIVERSAL");
        (
            status,
            accept,
            body["message"].as_str().unwrap().to_string(),
        )
    };

    // A coding Tollgate cannot read: 415, naming the codings it can (RFC 9110 15.5.16).
    let (status, accept, message) = refused(body, "br");
    assert_eq!(status, 415);
    assert_eq!(accept.as_deref(), Some("gzip, deflate"));
    assert!(
        message.contains("Content-Encoding") && message.contains("br"),
        "{message}"
    );
    // A broken stream: 400 naming the coding.
    let coded = gzip(body);
    let (status, _, message) = refused(&coded[..coded.len() - 6], "gzip");
    assert_eq!(status, 400);
    assert!(message.contains("Content-Encoding gzip"), "{message}");
    // Two megabytes of zeros in a few kilobytes: decoding stops at max_body_bytes.
    let bomb = gzip(&vec![b' '; 2 << 20]);
    assert!(bomb.len() < 1 << 20);
    let (status, _, message) = refused(&bomb, "gzip");
    assert_eq!(status, 413);
    assert!(
        message.contains("max_body_bytes (1048576) once decoded"),
        "{message}"
    );
    // Decoded JSON is judged as JSON.
    let (status, _, message) = refused(&gzip(b"{\"locations\":[1,"), "gzip");
    assert_eq!(status, 400);
    assert!(message.contains("invalid JSON"), "{message}");
    assert_eq!(echoed(), 0, "none reached the upstream");

    // The same body sent plain, and with an identity coding, is counted as before.
    let ok = send(
        &t,
        reqwest::Method::POST,
        "/demo/echo",
        &alice,
        Some("application/json"),
        body,
        &[("content-encoding", "identity")],
    );
    assert_eq!(ok.status, 200);
    assert_eq!(echoed(), 1);
}

#[test]
fn a_coded_capture_converts_only_within_max_capture_bytes_decoded() {
    let t = counting_echo("[limits]\nmax_capture_bytes = 2048\n");
    let alice = t.token("alice");
    // Under 2 KiB as sent, 20 KB decoded: stored whole, too large to convert.
    let plain = format!(
        r#"{{"locations":[{{"key":"a"}}],"pad":"{}"}}"#,
        " ".repeat(20_000)
    );
    let coded = gzip(plain.as_bytes());
    assert!(coded.len() < 2048);
    let call = post_gzip(&t, &alice, &coded);
    assert_eq!(call.status, 200);
    let r = data(&t, &alice, &call.code, "data_flow_convert=JSON");
    assert_eq!(r.status(), 400);
    let body = json_of(r);
    assert_error_shape(&body, "ACCOUNT");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("data_flow_convert") && message.contains("max_capture_bytes (2048)"),
        "{message}"
    );
    // As sent, it is still there.
    assert_eq!(data_ok(&t, &alice, &call.code, ""), coded);
}
