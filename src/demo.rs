//! The demo upstream: a small HTTP server with the shapes of the computation services Tollgate
//! fronts, so that a newcomer can try Tollgate and the integration tests can run against a real
//! upstream on loopback, with no HTTP server crate besides pingora.
//!
//! It owns the fake computation endpoints, its in-memory table of asynchronous processes, its
//! request statistics and the test hooks. It leaves authentication, points, quotas and capture to
//! the proxy, and the decision to start it to the wiring (`tollgate demo-upstream --listen ADDR`
//! runs [`run_standalone`]; `tollgate serve` adds [`demo_service`] to its own server when the
//! config asks for it).
//!
//! # Endpoints
//!
//! Every JSON answer carries a `tracedata` whose `code` is the request's `X-Tracecode` header, or
//! a new uuid when the header is absent.
//!
//! | Request | Answer |
//! |---|---|
//! | `POST /universal/plan/calculation` | 200 `{"tracedata", "result": {"locations", "orders", "performers", "transports", "input_bytes"}}`: the number of elements of each array of the input object |
//! | `POST /universal/plan/calculation_async` | 202 `{"tracedata", "calculation_progress": 0, "calculation_info": {"status": "WAITING", "calculation_time"}}`; starts a process whose id is the tracecode and which completes after [`DemoConfig::compute_time`]; posting an id again restarts that process |
//! | `GET /universal/plan/calculation_async/{id}` | 200 `{"tracedata", "calculation_progress": 0..100, "calculation_info": {"status", "calculation_time"}}`, status `IN_PROGRESS` then `FINISHED_IN_TIME`; 404 if unknown |
//! | `DELETE /universal/plan/calculation_async/{id}` | 204, the process is cancelled and forgotten (later calls about it answer 404); 404 if unknown |
//! | `GET /universal/plan/result/{id}` | 200 with the process state plus `"result"` (as the sync call) once finished; 202 with the process state while it computes (the result does not exist yet, but the id is known, so not 404); 404 if unknown |
//! | `POST /routing/matrix/calculation` | 200 `{"tracedata", "matrix": {"distances", "durations"}}`, two N x N arrays for the N `waypoints` of the input (at most 1000) |
//! | `POST /routing/route/calculation` | 200 `{"tracedata", "route": {"waypoints", "legs", "distance"}}` for the `waypoints` of the input |
//! | `GET /{service}/system/version` | 200 `{"major": 6, "minor": 20, "build": "demo"}` |
//! | `GET /{service}/system/check` | 200 `{"health": 1}` |
//! | anything else | 404 `{"tracedata", "message"}`; a known path with another method answers 405 |
//!
//! Processes are forgotten one hour after they start, and at most 10,000 are kept (the oldest
//! goes first), so memory stays bounded. Invalid JSON answers 400; bodies over 64 MiB answer 413.
//! Bodies in `Content-Encoding` gzip or deflate are read decoded (a broken stream answers 400,
//! another coding 415).
//!
//! # Test hooks
//!
//! These exist for the integration tests and are not part of the service shapes:
//! - `x-demo-delay-ms: N` on any request: wait N ms (at most 600,000) after reading the body and
//!   before answering.
//! - `x-demo-status: NNN` on any request: answer with status NNN (200..=599) instead, body kept
//!   (dropped for 204 and 304). Side effects still happen (an async process still starts).
//! - `GET /demo/stats`: `{"requests": {path: count}, "in_flight": n, "peak_in_flight": n,
//!   "bodies_bytes": total}`. A request is in flight from the moment its header is read until its
//!   answer is ready, just before the answer is written, so a client that got an answer never
//!   sees its own request still counted. Paths are counted without the query, up to 1000
//!   distinct paths (the rest under `(other)`); the `/demo/stats` requests themselves are not
//!   counted.
//! - `POST /demo/stats/reset`: zero the counts and bodies, set the peak to the current in-flight
//!   number; answers 204.
//! - `POST /demo/echo`: answers the request body back byte-exact with the request's
//!   `Content-Type` and `Content-Encoding`, and puts the request headers it received in the response header
//!   `x-demo-seen-headers` as a JSON object `{lowercase name: value}` (repeated headers joined
//!   with `, `).
//!
//! Every answer carries `Server-Timing: compute;dur=MS`, the demo's own time for the request.
//!
//! Bodies may use Content-Length or chunked framing; `Expect: 100-continue` is honoured;
//! connections are kept alive.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{ALLOW, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, EXPECT};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use parking_lot::Mutex;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::listening::Service as ListeningService;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::debug;
use uuid::Uuid;

use crate::coding::{self, Codings};

const TRACECODE_HEADER: &str = "x-tracecode";
const DELAY_HEADER: &str = "x-demo-delay-ms";
const STATUS_HEADER: &str = "x-demo-status";
const SEEN_HEADERS_HEADER: &str = "x-demo-seen-headers";

const PROCESS_TTL: Duration = Duration::from_secs(3600);
const MAX_PROCESSES: usize = 10_000;
const MAX_STATS_PATHS: usize = 1_000;
const OTHER_PATHS_KEY: &str = "(other)";
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
const MAX_DELAY_MS: u64 = 600_000;
const MAX_MATRIX_WAYPOINTS: usize = 1_000;
const KEEPALIVE_SECONDS: u64 = 60;
const LEG_DISTANCE_METERS: u64 = 1_000;
const LEG_DURATION_SECONDS: u64 = 60;
const STANDALONE_THREADS: usize = 2;
/// Short, because shutdown sleeps the whole grace period even when idle, and a demo holds
/// nothing worth waiting for.
const STANDALONE_GRACE_SECONDS: u64 = 1;

const SERVICE_NAMES: [&str; 12] = [
    "UNIVERSAL",
    "ROUTING",
    "ACCOUNT",
    "ADMIN",
    "STUDIO",
    "MONITOR",
    "PACKER",
    "AGRO",
    "STOCK",
    "LONGHAUL",
    "CLUSTER",
    "CARGOTIMETABLE",
];

/// How the demo upstream behaves.
#[derive(Debug, Clone, Copy)]
pub struct DemoConfig {
    /// How long an asynchronous process takes from its start to `FINISHED_IN_TIME`.
    pub compute_time: Duration,
}

/// A pingora service listening on `listen` (e.g. "127.0.0.1:8090") with `threads` worker threads.
///
/// Pingora binds the address when the server starts; a failure to bind there stops only this
/// service, so callers that want a clear error should check the address first.
pub fn demo_service(
    listen: &str,
    config: DemoConfig,
    threads: usize,
) -> impl pingora::services::Service + 'static {
    let mut service = ListeningService::new("demo-upstream".to_string(), DemoUpstream::new(config));
    service.add_tcp(listen);
    service.threads = Some(threads.max(1));
    service
}

/// Runs the demo upstream alone on `listen` until the process gets SIGTERM or SIGINT.
///
/// Fails at once when `listen` cannot be bound (malformed, taken, not a local address).
pub fn run_standalone(listen: &str, config: DemoConfig) -> std::io::Result<()> {
    // Pingora binds inside the service's runtime, where a failure only ends that service and
    // leaves the process running with nothing listening; binding once here turns that into an
    // error for the caller. The probe socket closes before pingora binds the same address.
    std::net::TcpListener::bind(listen).map_err(|error| {
        std::io::Error::new(error.kind(), format!("cannot listen on {listen}: {error}"))
    })?;
    let server_conf = ServerConf {
        threads: STANDALONE_THREADS,
        grace_period_seconds: Some(STANDALONE_GRACE_SECONDS),
        graceful_shutdown_timeout_seconds: Some(STANDALONE_GRACE_SECONDS),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None::<Opt>, server_conf);
    server.bootstrap();
    server.add_service(demo_service(listen, config, STANDALONE_THREADS));
    server.run(RunArgs::default());
    Ok(())
}

/// The application behind [`demo_service`]; its state lives as long as the service.
struct DemoUpstream {
    compute_time: Duration,
    processes: Mutex<ProcessTable>,
    stats: Mutex<RequestStats>,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
    bodies_bytes: AtomicU64,
}

#[async_trait]
impl HttpServerApp for DemoUpstream {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(error) => {
                debug!(%error, "demo upstream: reading a request header failed");
                return None;
            }
        }
        // Once the server shuts down, closing after each answer lets clients move away.
        let keepalive_seconds = (!*shutdown.borrow()).then_some(KEEPALIVE_SECONDS);
        session.set_keepalive(keepalive_seconds);

        let reply = self.serve(&mut session).await?;
        if let Err(error) = write_reply(&mut session, reply).await {
            debug!(%error, "demo upstream: writing an answer failed");
            return None;
        }
        let persistent_settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(stream) => stream
                .map(|stream| ReusedHttpStream::from_reusable_stream(stream, persistent_settings)),
            Err(error) => {
                debug!(%error, "demo upstream: finishing a request failed");
                None
            }
        }
    }
}

impl DemoUpstream {
    fn new(config: DemoConfig) -> Self {
        DemoUpstream {
            compute_time: config.compute_time,
            processes: Mutex::new(ProcessTable::new(PROCESS_TTL, MAX_PROCESSES)),
            stats: Mutex::new(RequestStats::default()),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            bodies_bytes: AtomicU64::new(0),
        }
    }

    /// Reads the rest of the request and computes its answer; `None` when the client is gone.
    async fn serve(&self, session: &mut ServerSession) -> Option<Reply> {
        let started = Instant::now();
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let headers = session.req_header().headers.clone();
        let is_stats_request = path == "/demo/stats" || path.starts_with("/demo/stats/");

        let in_flight = (!is_stats_request).then(|| {
            self.stats.lock().count(&path);
            InFlight::enter(&self.in_flight, &self.peak_in_flight)
        });

        let expects_continue = headers
            .get(EXPECT)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue {
            if let Err(error) = session.write_continue_response().await {
                debug!(%error, "demo upstream: writing 100 Continue failed");
                return None;
            }
        }
        let body = match read_body(session).await {
            Ok(BodyRead::Complete(body)) => body,
            Ok(BodyRead::TooLarge) => {
                // The unread rest of the body would be parsed as the next request.
                session.set_keepalive(None);
                let trace = Trace::new(&path, &headers);
                return Some(trace.error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request",
                    &format!("the demo upstream takes bodies up to {MAX_BODY_BYTES} bytes"),
                ));
            }
            Err(error) => {
                debug!(%error, "demo upstream: reading a request body failed");
                return None;
            }
        };
        if !is_stats_request {
            self.bodies_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }

        let hooks = match TestHooks::from_headers(&headers) {
            Ok(hooks) => hooks,
            Err(message) => {
                let trace = Trace::new(&path, &headers);
                return Some(trace.error(StatusCode::BAD_REQUEST, "test_hooks", &message));
            }
        };
        if let Some(delay) = hooks.delay {
            tokio::time::sleep(delay).await;
        }
        let mut reply = self.answer(&method, &path, &headers, body);
        if let Some(status) = hooks.status {
            reply.status = status;
        }
        // Its own time, as a computation service reports it (W3C Server Timing).
        if let Ok(timing) = HeaderValue::from_str(&format!(
            "compute;dur={:.3}",
            started.elapsed().as_secs_f64() * 1000.0
        )) {
            reply
                .headers
                .push((HeaderName::from_static("server-timing"), timing));
        }
        drop(in_flight);
        Some(reply)
    }

    fn answer(&self, method: &Method, path: &str, headers: &HeaderMap, body: Bytes) -> Reply {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let trace = Trace::new(path, headers);
        let endpoint = match endpoint(method, &segments) {
            Ok(endpoint) => endpoint,
            Err(EndpointMiss::NotFound) => {
                return trace.error(
                    StatusCode::NOT_FOUND,
                    "unknown_path",
                    &format!("no demo endpoint at {path}"),
                )
            }
            Err(EndpointMiss::MethodNotAllowed(allowed)) => {
                let mut reply = trace.error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "unknown_method",
                    &format!("{path} answers {allowed}"),
                );
                reply
                    .headers
                    .push((ALLOW, HeaderValue::from_static(allowed)));
                return reply;
            }
        };
        // A computation service reads gzip and deflate bodies; the echo answers the bytes as sent.
        let body = match endpoint {
            Endpoint::Echo => body,
            _ => match decoded(headers, body) {
                Ok(body) => body,
                Err((status, message)) => return trace.error(status, "content_encoding", &message),
            },
        };
        match endpoint {
            Endpoint::PlanCalculation => match summarize_plan(&body) {
                Ok(summary) => Reply::json(
                    StatusCode::OK,
                    &json!({
                        "tracedata": trace.data("plan_calculation"),
                        "result": summary,
                    }),
                ),
                Err(message) => trace.error(StatusCode::BAD_REQUEST, "plan_calculation", &message),
            },
            Endpoint::PlanCalculationAsync => match summarize_plan(&body) {
                Ok(summary) => {
                    let process = Process {
                        started_at: Instant::now(),
                        summary,
                    };
                    self.processes.lock().start(trace.code.clone(), process);
                    Reply::json(
                        StatusCode::ACCEPTED,
                        &json!({
                            "tracedata": trace.data("plan_calculation_async"),
                            "calculation_progress": 0,
                            "calculation_info": {
                                "status": "WAITING",
                                "calculation_time": iso_duration(Duration::ZERO),
                            },
                        }),
                    )
                }
                Err(message) => trace.error(
                    StatusCode::BAD_REQUEST,
                    "plan_calculation_async",
                    &message,
                ),
            },
            Endpoint::PlanState(id) => {
                let trace = trace.with_code(id);
                match self.process(id) {
                    Some(process) => {
                        let state = process.state(self.compute_time, Instant::now());
                        Reply::json(
                            StatusCode::OK,
                            &state.to_json(trace.data("plan_calculation_state")),
                        )
                    }
                    None => trace.unknown_process("plan_calculation_state", id),
                }
            }
            Endpoint::PlanCancel(id) => {
                let trace = trace.with_code(id);
                if self.processes.lock().cancel(id, Instant::now()) {
                    Reply::empty(StatusCode::NO_CONTENT)
                } else {
                    trace.unknown_process("plan_calculation_cancel", id)
                }
            }
            Endpoint::PlanResult(id) => {
                let trace = trace.with_code(id);
                let Some(process) = self.process(id) else {
                    return trace.unknown_process("plan_result", id);
                };
                let state = process.state(self.compute_time, Instant::now());
                let mut body = state.to_json(trace.data("plan_result"));
                if state.finished {
                    body["result"] = json!(process.summary);
                    Reply::json(StatusCode::OK, &body)
                } else {
                    Reply::json(StatusCode::ACCEPTED, &body)
                }
            }
            Endpoint::MatrixCalculation => match count_waypoints(&body) {
                Ok(waypoints) if waypoints > MAX_MATRIX_WAYPOINTS => trace.error(
                    StatusCode::BAD_REQUEST,
                    "matrix_calculation",
                    &format!(
                        "the demo matrix takes at most {MAX_MATRIX_WAYPOINTS} waypoints, got {waypoints}"
                    ),
                ),
                Ok(waypoints) => {
                    let (distances, durations) = demo_matrix(waypoints);
                    Reply::json(
                        StatusCode::OK,
                        &json!({
                            "tracedata": trace.data("matrix_calculation"),
                            "matrix": {"distances": distances, "durations": durations},
                        }),
                    )
                }
                Err(message) => {
                    trace.error(StatusCode::BAD_REQUEST, "matrix_calculation", &message)
                }
            },
            Endpoint::RouteCalculation => match count_waypoints(&body) {
                Ok(waypoints) => {
                    let legs = waypoints.saturating_sub(1) as u64;
                    Reply::json(
                        StatusCode::OK,
                        &json!({
                            "tracedata": trace.data("route_calculation"),
                            "route": {
                                "waypoints": waypoints,
                                "legs": legs,
                                "distance": legs * LEG_DISTANCE_METERS,
                            },
                        }),
                    )
                }
                Err(message) => trace.error(StatusCode::BAD_REQUEST, "route_calculation", &message),
            },
            Endpoint::SystemVersion => Reply::json(
                StatusCode::OK,
                &json!({"major": 6, "minor": 20, "build": "demo"}),
            ),
            Endpoint::SystemCheck => Reply::json(StatusCode::OK, &json!({"health": 1})),
            Endpoint::Stats => Reply::json(StatusCode::OK, &self.stats_json()),
            Endpoint::StatsReset => {
                self.stats.lock().requests_by_path.clear();
                self.bodies_bytes.store(0, Ordering::Relaxed);
                self.peak_in_flight
                    .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
                Reply::empty(StatusCode::NO_CONTENT)
            }
            Endpoint::Echo => echo(headers, body),
        }
    }

    fn process(&self, id: &str) -> Option<Process> {
        self.processes.lock().get(id, Instant::now())
    }

    fn stats_json(&self) -> Value {
        let requests = self.stats.lock().requests_by_path.clone();
        json!({
            "requests": requests,
            "in_flight": self.in_flight.load(Ordering::SeqCst),
            "peak_in_flight": self.peak_in_flight.load(Ordering::SeqCst),
            "bodies_bytes": self.bodies_bytes.load(Ordering::Relaxed),
        })
    }
}

enum Endpoint<'a> {
    PlanCalculation,
    PlanCalculationAsync,
    PlanState(&'a str),
    PlanCancel(&'a str),
    PlanResult(&'a str),
    MatrixCalculation,
    RouteCalculation,
    SystemVersion,
    SystemCheck,
    Stats,
    StatsReset,
    Echo,
}

enum EndpointMiss {
    NotFound,
    /// The path is known; the value is the `Allow` header listing the methods it takes.
    MethodNotAllowed(&'static str),
}

fn endpoint<'a>(method: &Method, segments: &[&'a str]) -> Result<Endpoint<'a>, EndpointMiss> {
    let only = |allowed: &'static str, endpoint: Endpoint<'a>| {
        // A HEAD is answered wherever a GET is, without the body (RFC 9110 9.3.2).
        if method.as_str() == allowed || (allowed == "GET" && *method == Method::HEAD) {
            Ok(endpoint)
        } else {
            Err(EndpointMiss::MethodNotAllowed(allowed))
        }
    };
    match segments {
        ["universal", "plan", "calculation"] => only("POST", Endpoint::PlanCalculation),
        ["universal", "plan", "calculation_async"] => only("POST", Endpoint::PlanCalculationAsync),
        ["universal", "plan", "calculation_async", id] if !id.is_empty() => match *method {
            Method::GET | Method::HEAD => Ok(Endpoint::PlanState(id)),
            Method::DELETE => Ok(Endpoint::PlanCancel(id)),
            _ => Err(EndpointMiss::MethodNotAllowed("GET, DELETE")),
        },
        ["universal", "plan", "result", id] if !id.is_empty() => {
            only("GET", Endpoint::PlanResult(id))
        }
        ["routing", "matrix", "calculation"] => only("POST", Endpoint::MatrixCalculation),
        ["routing", "route", "calculation"] => only("POST", Endpoint::RouteCalculation),
        [service, "system", "version"] if !service.is_empty() => {
            only("GET", Endpoint::SystemVersion)
        }
        [service, "system", "check"] if !service.is_empty() => only("GET", Endpoint::SystemCheck),
        ["demo", "stats"] => only("GET", Endpoint::Stats),
        ["demo", "stats", "reset"] => only("POST", Endpoint::StatsReset),
        ["demo", "echo"] => only("POST", Endpoint::Echo),
        _ => Err(EndpointMiss::NotFound),
    }
}

/// The tracedata of one answer: the tracecode and the service named by the path.
struct Trace {
    code: String,
    service: &'static str,
}

impl Trace {
    fn new(path: &str, headers: &HeaderMap) -> Self {
        let first_segment = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let service = SERVICE_NAMES
            .iter()
            .find(|name| name.eq_ignore_ascii_case(first_segment))
            .copied()
            .unwrap_or("UNIVERSAL");
        let code = headers
            .get(TRACECODE_HEADER)
            .and_then(|value| value.to_str().ok())
            .filter(|value| !value.is_empty())
            .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned);
        Trace { code, service }
    }

    /// An asynchronous process keeps one tracecode, so answers about it carry its id.
    fn with_code(self, code: &str) -> Self {
        Trace {
            code: code.to_owned(),
            service: self.service,
        }
    }

    fn data(&self, operation: &str) -> Value {
        json!({
            "code": self.code,
            "client": "demo_client",
            "server": "demo-upstream",
            "service": self.service,
            "operation": operation,
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false),
        })
    }

    fn error(&self, status: StatusCode, operation: &str, message: &str) -> Reply {
        Reply::json(
            status,
            &json!({"tracedata": self.data(operation), "message": message}),
        )
    }

    fn unknown_process(&self, operation: &str, id: &str) -> Reply {
        self.error(
            StatusCode::NOT_FOUND,
            operation,
            &format!("no calculation with id {id}"),
        )
    }
}

/// Hooks the integration tests steer the upstream with.
struct TestHooks {
    delay: Option<Duration>,
    status: Option<StatusCode>,
}

impl TestHooks {
    fn from_headers(headers: &HeaderMap) -> Result<Self, String> {
        let delay = match headers.get(DELAY_HEADER) {
            None => None,
            Some(value) => {
                let delay_ms = value
                    .to_str()
                    .ok()
                    .and_then(|text| text.trim().parse::<u64>().ok())
                    .filter(|delay_ms| *delay_ms <= MAX_DELAY_MS)
                    .ok_or_else(|| {
                        format!("{DELAY_HEADER} takes milliseconds from 0 to {MAX_DELAY_MS}")
                    })?;
                Some(Duration::from_millis(delay_ms))
            }
        };
        let status = match headers.get(STATUS_HEADER) {
            None => None,
            Some(value) => {
                let status = value
                    .to_str()
                    .ok()
                    .and_then(|text| text.trim().parse::<u16>().ok())
                    .filter(|code| (200..=599).contains(code))
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or_else(|| format!("{STATUS_HEADER} takes a status from 200 to 599"))?;
                Some(status)
            }
        };
        Ok(TestHooks { delay, status })
    }
}

/// Counts a request for as long as it lives.
struct InFlight<'a> {
    in_flight: &'a AtomicUsize,
}

impl<'a> InFlight<'a> {
    fn enter(in_flight: &'a AtomicUsize, peak_in_flight: &AtomicUsize) -> Self {
        let now_in_flight = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        peak_in_flight.fetch_max(now_in_flight, Ordering::SeqCst);
        InFlight { in_flight }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct RequestStats {
    requests_by_path: HashMap<String, u64>,
}

impl RequestStats {
    fn count(&mut self, path: &str) {
        if let Some(count) = self.requests_by_path.get_mut(path) {
            *count += 1;
        } else if self.requests_by_path.len() < MAX_STATS_PATHS {
            self.requests_by_path.insert(path.to_owned(), 1);
        } else {
            *self
                .requests_by_path
                .entry(OTHER_PATHS_KEY.to_owned())
                .or_insert(0) += 1;
        }
    }
}

/// What the demo "computes" from a plan task: the size of its arrays.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct PlanSummary {
    locations: usize,
    orders: usize,
    performers: usize,
    transports: usize,
    input_bytes: usize,
}

/// The arrays of a plan task, counted without building their elements.
#[derive(Deserialize)]
struct PlanTask {
    locations: Option<Vec<IgnoredAny>>,
    orders: Option<Vec<IgnoredAny>>,
    performers: Option<Vec<IgnoredAny>>,
    transports: Option<Vec<IgnoredAny>>,
}

fn summarize_plan(body: &[u8]) -> Result<PlanSummary, String> {
    let task: PlanTask = serde_json::from_slice(body)
        .map_err(|error| format!("the body is not a plan task: {error}"))?;
    let count = |items: Option<Vec<IgnoredAny>>| items.map_or(0, |items| items.len());
    Ok(PlanSummary {
        locations: count(task.locations),
        orders: count(task.orders),
        performers: count(task.performers),
        transports: count(task.transports),
        input_bytes: body.len(),
    })
}

#[derive(Deserialize)]
struct WaypointsTask {
    waypoints: Vec<IgnoredAny>,
}

fn count_waypoints(body: &[u8]) -> Result<usize, String> {
    let task: WaypointsTask = serde_json::from_slice(body)
        .map_err(|error| format!("the body is not a task with waypoints: {error}"))?;
    Ok(task.waypoints.len())
}

/// Distances (meters) and durations (seconds) between waypoints set on a line, one leg apart.
fn demo_matrix(waypoints: usize) -> (Vec<Vec<u64>>, Vec<Vec<u64>>) {
    let legs_between = |from: usize, to: usize| from.abs_diff(to) as u64;
    let distances = (0..waypoints)
        .map(|from| {
            (0..waypoints)
                .map(|to| legs_between(from, to) * LEG_DISTANCE_METERS)
                .collect()
        })
        .collect();
    let durations = (0..waypoints)
        .map(|from| {
            (0..waypoints)
                .map(|to| legs_between(from, to) * LEG_DURATION_SECONDS)
                .collect()
        })
        .collect();
    (distances, durations)
}

/// The body as it reads, decoded from its `Content-Encoding`; the error status and message
/// when it cannot be.
fn decoded(headers: &HeaderMap, body: Bytes) -> Result<Bytes, (StatusCode, String)> {
    match Codings::of_headers(headers) {
        Codings::Readable(codings) if codings.is_empty() => Ok(body),
        Codings::Readable(codings) => coding::decode(&codings, &body, MAX_BODY_BYTES)
            .map(Bytes::from)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("Content-Encoding: {e}"))),
        Codings::Unreadable(name) => Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding: '{name}' is not read here"),
        )),
    }
}

fn echo(headers: &HeaderMap, body: Bytes) -> Reply {
    let mut seen_headers: BTreeMap<&str, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        seen_headers
            .entry(name.as_str())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let seen_headers_json = json!(seen_headers).to_string();
    let mut reply = Reply {
        status: StatusCode::OK,
        headers: Vec::new(),
        body,
    };
    if let Some(content_type) = headers.get(CONTENT_TYPE) {
        reply.headers.push((CONTENT_TYPE, content_type.clone()));
    }
    // The bytes come back as they were sent, so in the same coding.
    for coding in headers.get_all(CONTENT_ENCODING) {
        reply.headers.push((CONTENT_ENCODING, coding.clone()));
    }
    // JSON escapes control characters, so the value is a valid header; a failure here would
    // only drop the header, which the tests reading it would notice.
    match HeaderValue::from_str(&seen_headers_json) {
        Ok(value) => reply
            .headers
            .push((HeaderName::from_static(SEEN_HEADERS_HEADER), value)),
        Err(error) => debug!(%error, "demo upstream: the seen headers are not a header value"),
    }
    reply
}

#[derive(Debug, Clone, Copy)]
struct Process {
    started_at: Instant,
    summary: PlanSummary,
}

/// Where an asynchronous process is at some instant.
struct ProcessState {
    progress_percent: u64,
    finished: bool,
    calculation_time: Duration,
}

impl Process {
    fn state(&self, compute_time: Duration, now: Instant) -> ProcessState {
        let elapsed = now.saturating_duration_since(self.started_at);
        if elapsed >= compute_time {
            return ProcessState {
                progress_percent: 100,
                finished: true,
                calculation_time: compute_time,
            };
        }
        // 100 is kept for the finished state, whatever the rounding.
        let progress_percent =
            (elapsed.as_millis() * 100 / compute_time.as_millis().max(1)).min(99) as u64;
        ProcessState {
            progress_percent,
            finished: false,
            calculation_time: elapsed,
        }
    }
}

impl ProcessState {
    fn to_json(&self, tracedata: Value) -> Value {
        let status = if self.finished {
            "FINISHED_IN_TIME"
        } else {
            "IN_PROGRESS"
        };
        json!({
            "tracedata": tracedata,
            "calculation_progress": self.progress_percent,
            "calculation_info": {
                "status": status,
                "calculation_time": iso_duration(self.calculation_time),
            },
        })
    }
}

/// The asynchronous processes by id, bounded in age and number.
struct ProcessTable {
    processes: HashMap<String, Process>,
    ttl: Duration,
    max_processes: usize,
}

impl ProcessTable {
    fn new(ttl: Duration, max_processes: usize) -> Self {
        ProcessTable {
            processes: HashMap::new(),
            ttl,
            max_processes,
        }
    }

    fn start(&mut self, id: String, process: Process) {
        if !self.processes.contains_key(&id) && self.processes.len() >= self.max_processes {
            let now = process.started_at;
            let ttl = self.ttl;
            self.processes
                .retain(|_, kept| now.saturating_duration_since(kept.started_at) < ttl);
            if self.processes.len() >= self.max_processes {
                let oldest_id = self
                    .processes
                    .iter()
                    .min_by_key(|(_, kept)| kept.started_at)
                    .map(|(oldest_id, _)| oldest_id.clone());
                if let Some(oldest_id) = oldest_id {
                    self.processes.remove(&oldest_id);
                }
            }
        }
        self.processes.insert(id, process);
    }

    fn get(&mut self, id: &str, now: Instant) -> Option<Process> {
        let process = *self.processes.get(id)?;
        if now.saturating_duration_since(process.started_at) >= self.ttl {
            self.processes.remove(id);
            return None;
        }
        Some(process)
    }

    /// Forgets the process; false when it was unknown (or already expired).
    fn cancel(&mut self, id: &str, now: Instant) -> bool {
        self.get(id, now).is_some() && self.processes.remove(id).is_some()
    }
}

/// An ISO 8601 duration with milliseconds, e.g. `PT1.500S`.
fn iso_duration(duration: Duration) -> String {
    format!("PT{}.{:03}S", duration.as_secs(), duration.subsec_millis())
}

struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Reply {
    fn json(status: StatusCode, body: &Value) -> Self {
        Reply {
            status,
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body: Bytes::from(body.to_string()),
        }
    }

    fn empty(status: StatusCode) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }
}

enum BodyRead {
    Complete(Bytes),
    TooLarge,
}

async fn read_body(session: &mut ServerSession) -> pingora::Result<BodyRead> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Ok(BodyRead::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(BodyRead::Complete(body.freeze()))
}

async fn write_reply(session: &mut ServerSession, reply: Reply) -> pingora::Result<()> {
    let bodiless =
        reply.status == StatusCode::NO_CONTENT || reply.status == StatusCode::NOT_MODIFIED;
    let mut header = ResponseHeader::build(reply.status, Some(reply.headers.len() + 1))?;
    for (name, value) in reply.headers {
        header.insert_header(name, value)?;
    }
    // Without a length the body would be close-delimited and the connection lost.
    let body = if bodiless {
        Bytes::new()
    } else {
        header.insert_header(CONTENT_LENGTH, reply.body.len())?;
        reply.body
    };
    session.write_response_header(Box::new(header)).await?;
    session.write_response_body(body, true).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::services::Service as _;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread::JoinHandle;

    /// A demo upstream on a free loopback port, stopped when dropped.
    struct RunningDemo {
        addr: String,
        shutdown: tokio::sync::watch::Sender<bool>,
        thread: Option<JoinHandle<()>>,
    }

    impl RunningDemo {
        fn start(compute_time: Duration) -> Self {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|probe| probe.local_addr())
                .expect("a free loopback port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            let mut service = demo_service(&addr, DemoConfig { compute_time }, 2);
            let (shutdown, shutdown_watch) = tokio::sync::watch::channel(false);
            let thread = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(service.start_service(None, shutdown_watch, 1));
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            while TcpStream::connect(&addr).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the demo upstream never listened"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            RunningDemo {
                addr,
                shutdown,
                thread: Some(thread),
            }
        }

        fn connect(&self) -> Client {
            let stream = TcpStream::connect(&self.addr).expect("connect to the demo upstream");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("set a read timeout");
            Client {
                reader: BufReader::new(stream),
            }
        }

        fn stats(&self) -> Value {
            self.connect()
                .send("GET", "/demo/stats", &[], Body::Empty)
                .json()
        }
    }

    impl Drop for RunningDemo {
        fn drop(&mut self) {
            let _ = self.shutdown.send(true);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    enum Body<'a> {
        Empty,
        Sized(&'a [u8]),
        Chunked(&'a [u8]),
    }

    /// A plain HTTP/1.1 client on one kept-alive connection.
    struct Client {
        reader: BufReader<TcpStream>,
    }

    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(header, _)| header.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }
    }

    impl Client {
        fn send(
            &mut self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: Body,
        ) -> Response {
            self.write_head(method, path, headers, &body);
            self.write_body(&body);
            self.read_response()
        }

        fn post_json(&mut self, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
            let mut headers = headers.to_vec();
            headers.push(("Content-Type", "application/json"));
            let body = body.to_string();
            self.send("POST", path, &headers, Body::Sized(body.as_bytes()))
        }

        fn write_head(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &Body) {
            let mut head = format!("{method} {path} HTTP/1.1\r\nHost: demo.test\r\n");
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            match body {
                Body::Empty => {}
                Body::Sized(bytes) => {
                    head.push_str(&format!("Content-Length: {}\r\n", bytes.len()))
                }
                Body::Chunked(_) => head.push_str("Transfer-Encoding: chunked\r\n"),
            }
            head.push_str("\r\n");
            self.reader
                .get_mut()
                .write_all(head.as_bytes())
                .expect("write a request head");
        }

        fn write_body(&mut self, body: &Body) {
            let stream = self.reader.get_mut();
            match body {
                Body::Empty => {}
                Body::Sized(bytes) => stream.write_all(bytes).expect("write a body"),
                Body::Chunked(bytes) => {
                    for chunk in bytes.chunks(100_000) {
                        stream
                            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                            .and_then(|()| stream.write_all(chunk))
                            .and_then(|()| stream.write_all(b"\r\n"))
                            .expect("write a chunk");
                    }
                    stream
                        .write_all(b"0\r\n\r\n")
                        .expect("write the last chunk");
                }
            }
        }

        /// The next final response, skipping informational ones.
        fn read_response(&mut self) -> Response {
            loop {
                let (status, headers) = self.read_head();
                if (100..200).contains(&status) {
                    continue;
                }
                let content_length = headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .map(|(_, value)| value.parse::<usize>().expect("a numeric Content-Length"));
                assert!(
                    content_length.is_some() || status == 204,
                    "a {status} answer without Content-Length cannot be kept alive"
                );
                let mut body = vec![0; content_length.unwrap_or(0)];
                self.reader.read_exact(&mut body).expect("read a body");
                return Response {
                    status,
                    headers,
                    body,
                };
            }
        }

        fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
            let mut status_line = String::new();
            self.reader
                .read_line(&mut status_line)
                .expect("read a status line");
            let status = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                self.reader.read_line(&mut line).expect("read a header");
                let line = line.trim_end();
                if line.is_empty() {
                    return (status, headers);
                }
                let (name, value) = line.split_once(':').expect("a header line");
                headers.push((name.to_owned(), value.trim().to_owned()));
            }
        }
    }

    fn plan_task() -> Value {
        json!({
            "locations": [{"key": "a"}, {"key": "b"}, {"key": "c"}],
            "orders": [{"key": "o1"}, {"key": "o2"}],
            "performers": [{"key": "p"}],
            "settings": {"ignored": [1, 2, 3, 4]},
        })
    }

    #[test]
    fn plan_calculation_counts_the_arrays_and_keeps_the_tracecode() {
        let demo = RunningDemo::start(Duration::ZERO);
        let mut client = demo.connect();
        let task = plan_task();
        let answer = client.post_json(
            "/universal/plan/calculation",
            &[("X-Tracecode", "trace-1")],
            &task,
        );
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        assert_eq!(body["tracedata"]["code"], "trace-1");
        assert_eq!(body["tracedata"]["service"], "UNIVERSAL");
        assert_eq!(
            body["result"],
            json!({"locations": 3, "orders": 2, "performers": 1, "transports": 0,
                   "input_bytes": task.to_string().len()})
        );

        let answer = client.post_json("/universal/plan/calculation", &[], &json!({}));
        let code = answer.json()["tracedata"]["code"].clone();
        let code = code.as_str().expect("a string tracecode");
        assert!(Uuid::parse_str(code).is_ok(), "{code} is not a uuid");

        let answer = client.send(
            "POST",
            "/universal/plan/calculation",
            &[("X-Tracecode", "trace-2")],
            Body::Sized(b"{not json"),
        );
        assert_eq!(answer.status, 400);
        assert_eq!(answer.json()["tracedata"]["code"], "trace-2");
    }

    #[test]
    fn async_process_runs_finishes_and_cancels() {
        let compute_time = Duration::from_millis(400);
        let demo = RunningDemo::start(compute_time);
        let mut client = demo.connect();
        let state_path = "/universal/plan/calculation_async/proc-1";
        let result_path = "/universal/plan/result/proc-1";

        let started = client.post_json(
            "/universal/plan/calculation_async",
            &[("X-Tracecode", "proc-1")],
            &plan_task(),
        );
        assert_eq!(started.status, 202);
        let body = started.json();
        assert_eq!(body["tracedata"]["code"], "proc-1");
        assert_eq!(body["calculation_info"]["status"], "WAITING");

        let state = client.send("GET", state_path, &[], Body::Empty);
        assert_eq!(state.status, 200);
        let body = state.json();
        assert_eq!(body["tracedata"]["code"], "proc-1");
        assert_eq!(body["calculation_info"]["status"], "IN_PROGRESS");
        assert!(body["calculation_progress"].as_u64() < Some(100));
        let pending = client.send("GET", result_path, &[], Body::Empty);
        assert_eq!(pending.status, 202);
        assert!(pending.json().get("result").is_none());

        std::thread::sleep(compute_time + Duration::from_millis(50));
        let body = client.send("GET", state_path, &[], Body::Empty).json();
        assert_eq!(body["calculation_info"]["status"], "FINISHED_IN_TIME");
        assert_eq!(body["calculation_progress"], 100);
        let done = client.send("GET", result_path, &[], Body::Empty);
        assert_eq!(done.status, 200);
        assert_eq!(done.json()["result"]["orders"], 2);

        assert_eq!(
            client.send("DELETE", state_path, &[], Body::Empty).status,
            204
        );
        assert_eq!(client.send("GET", state_path, &[], Body::Empty).status, 404);
        assert_eq!(
            client.send("GET", result_path, &[], Body::Empty).status,
            404
        );
        assert_eq!(
            client.send("DELETE", state_path, &[], Body::Empty).status,
            404
        );

        let unknown = client.send("GET", "/universal/plan/result/nobody", &[], Body::Empty);
        assert_eq!(unknown.status, 404);
        assert_eq!(unknown.json()["tracedata"]["code"], "nobody");
    }

    #[test]
    fn async_process_without_tracecode_gets_a_uuid_id() {
        let demo = RunningDemo::start(Duration::ZERO);
        let mut client = demo.connect();
        let started = client.post_json("/universal/plan/calculation_async", &[], &json!({}));
        let id = started.json()["tracedata"]["code"]
            .as_str()
            .expect("a string tracecode")
            .to_owned();
        assert!(Uuid::parse_str(&id).is_ok(), "{id} is not a uuid");
        let done = client.send(
            "GET",
            &format!("/universal/plan/result/{id}"),
            &[],
            Body::Empty,
        );
        assert_eq!(done.status, 200);
    }

    #[test]
    fn routing_answers_are_sized_by_the_waypoints() {
        let demo = RunningDemo::start(Duration::ZERO);
        let mut client = demo.connect();
        let matrix = client.post_json(
            "/routing/matrix/calculation",
            &[],
            &json!({"waypoints": [{"latitude": 1}, {"latitude": 2}, {"latitude": 3}]}),
        );
        assert_eq!(matrix.status, 200);
        let body = matrix.json();
        assert_eq!(body["tracedata"]["service"], "ROUTING");
        assert_eq!(
            body["matrix"]["distances"],
            json!([[0, 1000, 2000], [1000, 0, 1000], [2000, 1000, 0]])
        );
        assert_eq!(body["matrix"]["durations"][0], json!([0, 60, 120]));

        let too_many = json!({"waypoints": vec![json!({}); MAX_MATRIX_WAYPOINTS + 1]});
        let refused = client.post_json("/routing/matrix/calculation", &[], &too_many);
        assert_eq!(refused.status, 400);
        let missing = client.post_json("/routing/matrix/calculation", &[], &json!({}));
        assert_eq!(missing.status, 400);

        let route = client.post_json(
            "/routing/route/calculation",
            &[],
            &json!({"waypoints": [{}, {}, {}, {}]}),
        );
        assert_eq!(
            route.json()["route"],
            json!({"waypoints": 4, "legs": 3, "distance": 3000})
        );
    }

    #[test]
    fn system_endpoints_unknown_paths_and_wrong_methods() {
        let demo = RunningDemo::start(Duration::ZERO);
        let mut client = demo.connect();
        let version = client.send("GET", "/routing/system/version", &[], Body::Empty);
        assert_eq!(
            version.json(),
            json!({"major": 6, "minor": 20, "build": "demo"})
        );
        let check = client.send("GET", "/universal/system/check", &[], Body::Empty);
        assert_eq!(check.json(), json!({"health": 1}));

        let unknown = client.send("GET", "/universal/nothing/here?x=1", &[], Body::Empty);
        assert_eq!(unknown.status, 404);
        assert!(unknown.json()["message"].is_string());
        let wrong = client.send("GET", "/universal/plan/calculation", &[], Body::Empty);
        assert_eq!(wrong.status, 405);
        assert_eq!(wrong.header("allow"), Some("POST"));
    }

    #[test]
    fn echo_returns_large_bodies_byte_exact_and_shows_the_headers() {
        let demo = RunningDemo::start(Duration::ZERO);
        let mut client = demo.connect();
        let five_mb: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let echoed = client.send(
            "POST",
            "/demo/echo",
            &[
                ("Content-Type", "application/x-demo"),
                ("X-Tracecode", "echo-1"),
            ],
            Body::Chunked(&five_mb),
        );
        assert_eq!(echoed.status, 200);
        assert_eq!(echoed.header("content-type"), Some("application/x-demo"));
        assert!(echoed.body == five_mb, "the chunked body came back changed");
        let seen: Value = serde_json::from_str(
            echoed
                .header(SEEN_HEADERS_HEADER)
                .expect("the seen headers header"),
        )
        .expect("seen headers as JSON");
        assert_eq!(seen["x-tracecode"], "echo-1");
        assert_eq!(seen["transfer-encoding"], "chunked");

        let ten_mb: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
        let echoed = client.send(
            "POST",
            "/demo/echo",
            &[("Content-Type", "application/octet-stream")],
            Body::Sized(&ten_mb),
        );
        assert!(echoed.body == ten_mb, "the sized body came back changed");

        let bodies_bytes = demo.stats()["bodies_bytes"].as_u64();
        assert_eq!(bodies_bytes, Some((five_mb.len() + ten_mb.len()) as u64));
    }

    #[test]
    fn expect_continue_gets_100_before_the_body_is_sent() {
        let demo = RunningDemo::start(Duration::ZERO);
        let mut client = demo.connect();
        let body = Body::Sized(b"{\"orders\": [1]}");
        client.write_head(
            "POST",
            "/universal/plan/calculation",
            &[("Expect", "100-continue")],
            &body,
        );
        let (status, _) = client.read_head();
        assert_eq!(status, 100);
        client.write_body(&body);
        let answer = client.read_response();
        assert_eq!(answer.json()["result"]["orders"], 1);
    }

    #[test]
    fn status_and_delay_hooks_steer_the_answer() {
        let demo = RunningDemo::start(Duration::ZERO);
        let mut client = demo.connect();
        let forced = client.send(
            "GET",
            "/universal/system/check",
            &[("x-demo-status", "503")],
            Body::Empty,
        );
        assert_eq!(forced.status, 503);
        assert_eq!(forced.json(), json!({"health": 1}));
        let refused = client.send(
            "GET",
            "/universal/system/check",
            &[("x-demo-status", "42")],
            Body::Empty,
        );
        assert_eq!(refused.status, 400);

        let started = Instant::now();
        let delayed = client.send(
            "GET",
            "/universal/system/check",
            &[("x-demo-delay-ms", "300")],
            Body::Empty,
        );
        assert_eq!(delayed.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn stats_count_requests_bodies_and_the_peak_in_flight() {
        let demo = RunningDemo::start(Duration::ZERO);
        demo.connect()
            .send("GET", "/universal/system/check", &[], Body::Empty);
        let reset = demo
            .connect()
            .send("POST", "/demo/stats/reset", &[], Body::Empty);
        assert_eq!(reset.status, 204);
        assert_eq!(
            demo.stats(),
            json!({"requests": {}, "in_flight": 0, "peak_in_flight": 0, "bodies_bytes": 0})
        );

        let task = plan_task().to_string();
        let concurrent_requests = 4;
        let clients: Vec<Client> = (0..concurrent_requests).map(|_| demo.connect()).collect();
        let workers: Vec<JoinHandle<u16>> = clients
            .into_iter()
            .map(|mut client| {
                let task = task.clone();
                std::thread::spawn(move || {
                    client
                        .send(
                            "POST",
                            "/universal/plan/calculation?mode=slow",
                            &[("x-demo-delay-ms", "500")],
                            Body::Sized(task.as_bytes()),
                        )
                        .status
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(demo.stats()["in_flight"], concurrent_requests);
        for worker in workers {
            assert_eq!(worker.join().expect("a client thread"), 200);
        }

        let stats = demo.stats();
        assert_eq!(stats["requests"], json!({"/universal/plan/calculation": 4}));
        assert_eq!(stats["in_flight"], 0);
        assert_eq!(stats["peak_in_flight"], concurrent_requests);
        assert_eq!(stats["bodies_bytes"], concurrent_requests * task.len());
    }

    #[test]
    fn run_standalone_reports_an_address_it_cannot_take() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = taken.local_addr().expect("its address").to_string();
        let config = DemoConfig {
            compute_time: Duration::ZERO,
        };
        let error = run_standalone(&addr, config).expect_err("the port is taken");
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        assert!(error.to_string().contains(&addr));
    }

    #[test]
    fn process_progress_climbs_to_finished() {
        let started_at = Instant::now();
        let process = Process {
            started_at,
            summary: summarize_plan(b"{}").expect("an empty task"),
        };
        let compute_time = Duration::from_secs(10);
        let quarter = process.state(compute_time, started_at + Duration::from_millis(2_500));
        assert_eq!((quarter.progress_percent, quarter.finished), (25, false));
        let almost = process.state(compute_time, started_at + Duration::from_millis(9_999));
        assert_eq!((almost.progress_percent, almost.finished), (99, false));
        let done = process.state(compute_time, started_at + compute_time);
        assert_eq!((done.progress_percent, done.finished), (100, true));
        assert_eq!(done.calculation_time, compute_time);
        let instant = process.state(Duration::ZERO, started_at);
        assert!(instant.finished);
    }

    #[test]
    fn process_table_forgets_expired_and_oldest_processes() {
        let ttl = Duration::from_secs(60);
        let mut table = ProcessTable::new(ttl, 2);
        let start = Instant::now();
        let summary = summarize_plan(b"{}").expect("an empty task");
        let at = |seconds: u64| Process {
            started_at: start + Duration::from_secs(seconds),
            summary,
        };
        table.start("first".to_owned(), at(0));
        table.start("second".to_owned(), at(1));
        table.start("second".to_owned(), at(2));
        assert_eq!(table.processes.len(), 2, "restarting an id takes no room");
        table.start("third".to_owned(), at(3));
        assert!(table.get("first", start).is_none(), "the oldest goes first");
        assert!(table
            .get("second", start + Duration::from_secs(3))
            .is_some());
        assert!(table.get("third", start + Duration::from_secs(3)).is_some());

        assert!(table
            .get("second", start + Duration::from_secs(2) + ttl)
            .is_none());
        assert!(
            !table.cancel("second", start),
            "expired processes stay gone"
        );
        assert!(table.cancel("third", start + Duration::from_secs(4)));
        assert!(table.processes.is_empty());
    }

    #[test]
    fn stats_fold_paths_beyond_the_cap() {
        let mut stats = RequestStats::default();
        for index in 0..MAX_STATS_PATHS + 5 {
            stats.count(&format!("/path/{index}"));
        }
        stats.count("/path/0");
        assert_eq!(stats.requests_by_path.len(), MAX_STATS_PATHS + 1);
        assert_eq!(stats.requests_by_path.get(OTHER_PATHS_KEY), Some(&5));
        assert_eq!(stats.requests_by_path.get("/path/0"), Some(&2));
    }
}
