//! The pingora side of Tollgate: one `HttpServerApp` whose steps read like the life of a call.
//!
//! ```text
//!  read the request head ── unreadable → 400 in the API shape, connection closed
//!  handle ─┬─ /account/*  → account::Api answers locally ───────────────────────┐
//!          └─ route → authenticate → tracecode/owner → read whole body           │
//!             → count points → admit (lease) → upstream::exchange                │
//!               (forward buffered body, stream answer back, capture)             │
//!  finish ◄──────────────────────────────────────────────────────────────────────┘
//!     settle the lease (commit on 2xx, else refund) → record (audit, payloads,
//!     statistics → store writer) → metrics → hand the connection back for the next call
//! ```
//! Tollgate is its own HTTP server app on pingora's server, not a `ProxyHttp` under pingora's
//! proxy loop: every call is answered by Tollgate itself (the upstream leg included), so the
//! proxy loop's per-call machinery (its session wrapper, module filters, cache state, boxed
//! phase futures) was cost without use, and its request reading answered a request it could
//! not parse with an empty 400 outside the API's error shape. The work lives in the domain
//! modules; each step here is a few lines. A lease lives in the per-request context, so even
//! when `finish` does not run (a panic, a shutdown that drops the call) dropping the context
//! refunds it and frees the slot.

mod pool;
pub mod upstream;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::connectors::TransportConnector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession as Session;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::HttpPeer;
use uuid::Uuid;

use crate::account::{self, AccountRequest};
use crate::app::App;
use crate::coding::{self, Codings, DecodeError};
use crate::config::{MethodMatch, Route};
use crate::error::ApiError;
use crate::model::{Role, ServiceName};
use crate::quota::ledger::{Lease, Rejection, Today};
use crate::quota::points::{count_points, Points, PointsCount};
use crate::quota::LedgerKey;
use crate::store::writer::CallRecord;
use crate::store::{AuditRecord, Payload, ProcessRecord, UserRecord};
use crate::trace::{self, Tracedata};
use upstream::RequestBody;

pub const TRACECODE_HEADER: &str = "x-tracecode";
/// The answer's names, set on every proxied call: as `HeaderName`s they need no parsing.
const X_TRACECODE: http::HeaderName = http::HeaderName::from_static(TRACECODE_HEADER);
const SERVER_TIMING: http::HeaderName = http::HeaderName::from_static("server-timing");
pub const CLIENT_HEADER: &str = "x-client";
pub const POINTS_HEADER: &str = "x-points";
pub const UNIQUE_POINTS_HEADER: &str = "x-unique-points";

pub struct Tollgate {
    app: Arc<App>,
    transport: TransportConnector,
    upstreams: Vec<pool::Upstream>,
    /// Per route that sets `requests_per_second`: one rate limiter keyed by user.
    rate_limits: Vec<Option<governor::DefaultKeyedRateLimiter<Arc<str>>>>,
    /// Some route names a process id, so a process may be followed up and new ones must be
    /// registered; without one the registry would only grow.
    follow_ups: bool,
}

/// The in-flight gauge, decremented however the call ends.
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What one call carries from phase to phase.
pub struct Ctx {
    started: Instant,
    code: Uuid,
    route: Option<usize>,
    user: Option<Arc<UserRecord>>,
    lease: Option<Lease<LedgerKey>>,
    points: Points,
    stage: u8,
    process: Option<ProcessRecord>,
    input: Option<Payload>,
    output: Option<Payload>,
    upstream_status: Option<u16>,
    /// The upstream's answer broke off after its head: not charged whatever its status.
    upstream_failed: bool,
    /// The call was sent on to the upstream (whether or not it answered): it goes on record.
    forwarded: bool,
    /// The answer's head went to the caller and its body broke off (the upstream's failed, or
    /// the caller left): the connection is dropped, never ended as if the answer were whole.
    broken_off: bool,
    /// The caller's body stopped coming or broke off: nothing more is read from it.
    body_broken: bool,
    /// A HEAD: it asks after a resource (or a process) and changes nothing on record but
    /// the audit.
    asks_only: bool,
    /// The status this call answered with (0: none was written).
    status: u16,
    local_day: i32,
    _in_flight: Option<InFlight>,
}

impl Tollgate {
    pub fn new(app: Arc<App>) -> Tollgate {
        // Idle connections are kept by `pool`, never by the transport's own pool.
        let transport = TransportConnector::new(None);
        let upstreams = app
            .config
            .upstreams
            .iter()
            .map(|u| {
                let mut peer = HttpPeer::new(u.address, false, String::new());
                peer.options.connection_timeout = Some(u.connect_timeout);
                peer.options.total_connection_timeout = Some(u.connect_timeout);
                pool::Upstream::new(peer, u.keepalive, u.idle_timeout)
            })
            .collect();
        let rate_limits = app
            .config
            .routes
            .iter()
            .map(|r| {
                let per_second = std::num::NonZeroU32::new(r.requests_per_second?)?;
                Some(governor::RateLimiter::keyed(governor::Quota::per_second(
                    per_second,
                )))
            })
            .collect();
        let follow_ups = app.config.routes.iter().any(|r| r.process_id.is_some());
        Tollgate {
            app,
            transport,
            upstreams,
            rate_limits,
            follow_ups,
        }
    }

    fn route(&self, req: &RequestHeader) -> Option<(usize, Option<Result<Uuid, ()>>)> {
        let path = req.uri.path();
        self.app
            .config
            .routes
            .iter()
            .enumerate()
            .find_map(|(i, r)| {
                if let MethodMatch::One(m) = &r.method {
                    // A HEAD is served wherever a GET is (RFC 9110 9.3.2).
                    let head_of_get = req.method == http::Method::HEAD && m == http::Method::GET;
                    if *m != req.method && !head_of_get {
                        return None;
                    }
                }
                let id = r.pattern.matches(path, r.process_id.as_deref())?;
                Some((i, id.map(canonical_tracecode)))
            })
    }

    /// The methods served at `path`, for the `Allow` of a 405 (RFC 9110 15.5.6): the account
    /// API's, or the routes': a GET route serves HEAD too, and a route of any method the usual
    /// ones.
    fn allowed_methods(&self, path: &str) -> String {
        if let Some(rest) = path.strip_prefix("/account/") {
            return crate::account::allowed_methods(rest)
                .unwrap_or_default()
                .to_string();
        }
        const ANY: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
        let mut allowed: Vec<&str> = Vec::new();
        for route in &self.app.config.routes {
            if route
                .pattern
                .matches(path, route.process_id.as_deref())
                .is_none()
            {
                continue;
            }
            let methods: &[&str] = match &route.method {
                MethodMatch::Any => &ANY,
                MethodMatch::One(m) if *m == http::Method::GET => &["GET", "HEAD"],
                MethodMatch::One(m) => &[m.as_str()],
            };
            for method in methods {
                if !allowed.contains(method) {
                    allowed.push(method);
                }
            }
        }
        allowed.join(", ")
    }

    fn tracedata(&self, ctx: &Ctx, service: ServiceName, operation: &str) -> Tracedata {
        let (client, tz) = match &ctx.user {
            Some(u) => (trace::client_label(&u.company_key, &u.username), u.timezone),
            None => (trace::ANONYMOUS.to_string(), 0),
        };
        Tracedata {
            code: ctx.code,
            client,
            server: self.app.config.server.name.clone(),
            service,
            operation: operation.into(),
            time: trace::in_timezone(Utc::now(), tz),
        }
    }

    /// Answers a proxied route's error in the API shape.
    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        error: ApiError,
        extra: &[(&str, String)],
    ) {
        // A call refused before its route was looked up (a coding not served, say) still
        // names the route its path and method reach.
        let route = ctx
            .route
            .or_else(|| self.route(session.req_header()).map(|(index, _)| index));
        let (service, operation) = match route.map(|i| &self.app.config.routes[i]) {
            Some(r) => (r.service, r.operation.to_string()),
            None => (
                guess_service(session.req_header().uri.path()),
                "route_lookup".to_string(),
            ),
        };
        self.reject_as(session, ctx, error, service, &operation, extra)
            .await;
    }

    /// Answers an error in the API shape, its tracedata naming `service` and `operation`.
    async fn reject_as(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        error: ApiError,
        service: ServiceName,
        operation: &str,
        extra: &[(&str, String)],
    ) {
        let body = error.body(&self.tracedata(ctx, service, operation));
        let mut headers: Vec<(&str, String)> = extra.to_vec();
        headers.extend(error.headers());
        ctx.status = error.status;
        self.close_if_draining(session);
        let _ = respond(
            session,
            error.status,
            "application/json",
            &ctx.code,
            &headers,
            Bytes::from(body),
        )
        .await;
    }

    async fn serve_account(&self, session: &mut Session, ctx: &mut Ctx) {
        let limit = self
            .app
            .config
            .limits
            .max_body_bytes
            .min(ACCOUNT_BODY_LIMIT);
        let body = match read_body(session, limit, true, None).await {
            Ok(mut b) => Ok(b.whole().clone()),
            // Either way the rest of the body is unread: the connection cannot be reused.
            Err(e) => {
                session.set_keepalive(None);
                ctx.body_broken = !matches!(e, BodyError::TooLarge);
                Err(match e {
                    BodyError::TooLarge => ApiError::new(
                        413,
                        format!("body: larger than the account API accepts ({limit} bytes)"),
                    ),
                    _ => e.unread(&self.app.config.limits),
                })
            }
        };
        let req = session.req_header();
        let header = |name: &str| req.headers.get(name).map(|v| v.as_bytes());
        let request = AccountRequest {
            // A HEAD is answered as the GET would be, without the body (pingora writes none
            // for a HEAD).
            method: if req.method == http::Method::HEAD {
                &http::Method::GET
            } else {
                &req.method
            },
            path: req.uri.path(),
            query: req.uri.query().unwrap_or(""),
            authorization: header("authorization"),
            content_type: header("content-type"),
            accept_encoding: header("accept-encoding"),
            body,
            client_ip: client_ip(session),
            code: ctx.code,
        };
        let response = account::handle(&self.app, request).await;
        ctx.status = response.status;
        self.app
            .metrics
            .account_requests
            .with_label_values(&[status_class(response.status)])
            .inc();
        let headers: Vec<(&str, String)> = response
            .headers
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        self.close_if_draining(session);
        let _ = respond(
            session,
            response.status,
            &response.content_type,
            &ctx.code,
            &headers,
            response.body,
        )
        .await;
    }

    /// Steps 1-8 of a proxied call; errors are answered by the caller.
    async fn proxy_call(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<(), (ApiError, Vec<(&'static str, String)>)> {
        let app = &self.app;
        let plain = |e: ApiError| (e, Vec::new());
        let (route_index, process_id) = self.route(session.req_header()).ok_or_else(|| {
            app.metrics
                .rejections
                .with_label_values(&["no_route"])
                .inc();
            plain(ApiError::not_found(
                session.req_header().uri.path().to_string(),
            ))
        })?;
        ctx.route = Some(route_index);
        ctx.asks_only = session.req_header().method == http::Method::HEAD;
        let route = &app.config.routes[route_index];
        let metrics = &app.metrics.routes[route_index];
        ctx._in_flight = Some({
            app.metrics.in_flight.inc();
            InFlight(app.metrics.in_flight.clone())
        });

        // Who is calling.
        let user = if route.auth {
            let user = app
                .authority
                .authenticate(
                    session
                        .req_header()
                        .headers
                        .get("authorization")
                        .map(|v| v.as_bytes()),
                )
                .map_err(plain)?;
            ctx.user = Some(user.clone());
            if !route.roles.is_empty() && !user.roles.iter().any(|r| route.roles.contains(r)) {
                return Err(plain(ApiError::forbidden(
                    "this route is not open to your role",
                )));
            }
            Some(user)
        } else {
            None
        };
        if let (Some(limiter), Some(user)) = (&self.rate_limits[route_index], &user) {
            if let Err(not_until) = limiter.check_key(&Arc::from(user.username.as_str())) {
                use governor::clock::Clock;
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                app.metrics
                    .rejections
                    .with_label_values(&["requests_per_second"])
                    .inc();
                let per_second = route.requests_per_second.unwrap_or(0);
                let wait = (wait.as_secs_f64().ceil() as u64).max(1);
                return Err((
                    ApiError::too_many(
                        format!("requests_per_second: at most {per_second} calls per second"),
                        wait,
                    ),
                    request_rate_headers(per_second, wait),
                ));
            }
        }
        let now_utc = Utc::now();
        let tz = user.as_ref().map(|u| u.timezone).unwrap_or(0);

        // Which process: a follow-up reuses (and must own) its tracecode.
        let owner = user
            .as_ref()
            .map(|u| u.username.as_str())
            .unwrap_or(trace::ANONYMOUS);
        let company = user
            .as_ref()
            .map(|u| u.company_key.as_str())
            .unwrap_or(trace::ANONYMOUS);
        let utc_day = crate::store::day_of_ms(now_utc.timestamp_millis());
        // The owner check comes now; the exchange is counted (and given its stage) only when
        // it is sent on, so a follow-up refused below (413, 429, 402...) takes no stage.
        let followed = match process_id {
            Some(Ok(code)) => {
                ctx.code = code;
                let admin = user
                    .as_ref()
                    .is_some_and(|u| u.roles.contains(&Role::ADMIN));
                let store = &app.store;
                let entry = app
                    .processes
                    .follow_up(code, owner, admin, || {
                        store
                            .process(&code)
                            .ok()
                            .flatten()
                            .map(|p| (p.owner, p.company_key, p.day, p.exchanges))
                    })
                    .map_err(|_| plain(ApiError::not_found(code.to_string())))?;
                Some(entry)
            }
            Some(Err(())) => {
                return Err(plain(ApiError::not_found(
                    session.req_header().uri.path().to_string(),
                )))
            }
            None => None,
        };

        // The whole body, before anything reaches the upstream; its points counted as it arrives.
        let mut counting = PointsCount::new(&route.points);
        let whole = !route.points.array_pointers.is_empty();
        // A coded body (gzip, deflate) is counted decoded, once whole, and forwarded as sent.
        let codings = if whole {
            match Codings::of_headers(&session.req_header().headers) {
                Codings::Readable(codings) => codings,
                Codings::Unreadable(name) => {
                    session.set_keepalive(None);
                    app.metrics
                        .rejections
                        .with_label_values(&["unreadable_content_coding"])
                        .inc();
                    // RFC 9110 15.5.16: the answer names the codings that would do.
                    let error = ApiError::new(
                        415,
                        format!(
                            "Content-Encoding: '{name}' cannot be read to count points \
                             (accepted: {}, or none)",
                            coding::READABLE
                        ),
                    );
                    return Err((error, vec![("Accept-Encoding", coding::READABLE.into())]));
                }
            }
        } else {
            Vec::new()
        };
        let limit = app.config.limits.max_body_bytes;
        // The rest of the body is not read: the connection closes after the answer.
        let too_large = |session: &mut Session, how: String| {
            session.set_keepalive(None);
            app.metrics
                .rejections
                .with_label_values(&["body_too_large"])
                .inc();
            plain(ApiError::new(
                413,
                format!("body: larger than max_body_bytes ({limit}){how}"),
            ))
        };
        let counted_on_arrival = (whole && codings.is_empty()).then_some(&mut counting);
        let mut body = match read_body(session, limit, whole, counted_on_arrival).await {
            Ok(b) => b,
            Err(BodyError::TooLarge) => return Err(too_large(session, String::new())),
            Err(e) => {
                session.set_keepalive(None);
                ctx.body_broken = true;
                return Err(plain(e.unread(&app.config.limits)));
            }
        };

        // Points, then the one atomic admission.
        // Counting needs the body in one piece; a route without a points rule never joins it.
        let counted = if !whole {
            Ok(Points::default())
        } else if codings.is_empty() {
            counting.finish(body.whole())
        } else {
            let named = || {
                let names: Vec<_> = codings.iter().map(|c| c.name()).collect();
                names.join(", ")
            };
            // A few kilobytes of gzip can decode to max_body_bytes, a thousand times the work
            // of their size: off the threads that serve calls.
            // At most a few at once, each holding up to max_body_bytes decoded: the rest wait.
            static DECODING: tokio::sync::Semaphore =
                tokio::sync::Semaphore::const_new(CODED_BODIES_AT_ONCE);
            let _turn = DECODING
                .acquire()
                .await
                .map_err(|e| plain(ApiError::internal(e.to_string())))?;
            let coded = body.whole().clone();
            let (applied, shared) = (codings.clone(), self.app.clone());
            let counted = tokio::task::spawn_blocking(move || {
                let decoded = coding::decode(&applied, &coded, limit)?;
                Ok(count_points(
                    &decoded,
                    &shared.config.routes[route_index].points,
                ))
            })
            .await
            .map_err(|e| plain(ApiError::internal(e.to_string())))?;
            match counted {
                Ok(counted) => counted,
                Err(DecodeError::TooLarge(_)) => {
                    let how = format!(" once decoded (Content-Encoding: {})", named());
                    return Err(too_large(session, how));
                }
                Err(invalid) => {
                    app.metrics
                        .rejections
                        .with_label_values(&["invalid_content_coding"])
                        .inc();
                    return Err(plain(ApiError::bad_request(format!(
                        "body: Content-Encoding {}: {invalid}",
                        named()
                    ))));
                }
            }
        };
        ctx.points = counted.map_err(|e| {
            app.metrics
                .rejections
                .with_label_values(&["invalid_json"])
                .inc();
            plain(ApiError::bad_request(format!("body: {e}")))
        })?;
        // The caller's ledger account and limits, for the RateLimit fields of the answer.
        let mut metered = None;
        // Every call sent on goes on record, with a token or without: none is sent while the
        // store cannot take its record (failing, or too far behind).
        if !app.writer.has_room() {
            app.metrics
                .rejections
                .with_label_values(&["store_backlog"])
                .inc();
            return Err(plain(ApiError::unavailable(
                "the audit store is behind; try again shortly",
                1,
            )));
        }
        // The user's day at admission, not when the head came: a body still arriving at
        // midnight is admitted against (and charged to) the new day.
        let today = Today::at(Utc::now().timestamp(), tz);
        ctx.local_day = today.day;
        if let Some(user) = &user {
            let key: LedgerKey = (
                Arc::from(user.username.as_str()),
                route.service,
                route.method_group,
            );
            let limits = app.quotas.limits(user, route.service, route.method_group);
            match app
                .ledger
                .admit(&key, &limits, ctx.points.points, today, Instant::now())
            {
                Ok(lease) => ctx.lease = Some(lease),
                Err(rejection) => {
                    let headers = rate_limit_headers(app.ledger.remaining(&key, &limits, today));
                    app.metrics
                        .rejections
                        .with_label_values(&[rejection_reason(&rejection)])
                        .inc();
                    return Err((rejection_error(&rejection), headers));
                }
            }
            metered = Some((key, limits));
        }
        let call_points = ctx.points.points;

        // Forward, stream back, capture.
        if route.capture {
            let cap = app.config.limits.max_capture_bytes;
            ctx.input = Some(Payload {
                content_encoding: coding::field(&session.req_header().headers),
                content_type: session
                    .req_header()
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                truncated: body.len() > cap,
                body: body.prefix(cap),
            });
        }
        let client = user
            .as_ref()
            .map(|u| trace::client_label(&u.company_key, &u.username))
            .unwrap_or_else(|| trace::ANONYMOUS.into());
        let code = ctx.code.to_string();
        let (points, unique) = (
            ctx.points.points.to_string(),
            ctx.points.unique_points.to_string(),
        );
        let upstream_cfg = &app.config.upstreams[route.upstream];
        let req = upstream::upstream_request(
            session.req_header(),
            &upstream_cfg.authority,
            body.len(),
            &[
                (TRACECODE_HEADER, &code),
                (CLIENT_HEADER, &client),
                (POINTS_HEADER, &points),
                (UNIQUE_POINTS_HEADER, &unique),
            ],
            &[
                "authorization",
                "proxy-authorization",
                POINTS_HEADER,
                UNIQUE_POINTS_HEADER,
            ],
        )
        .ok_or_else(|| plain(ApiError::bad_request("request head cannot be forwarded")))?;
        let leg = upstream::Leg {
            draining: &app.draining,
            transport: &self.transport,
            upstream: &self.upstreams[route.upstream],
            total_timeout: route.total_timeout.unwrap_or(upstream_cfg.total_timeout),
            max_capture_bytes: if route.capture {
                app.config.limits.max_capture_bytes
            } else {
                0
            },
        };
        let started = ctx.started;
        // The exchange is sent on: it counts in its process from here, and goes on record.
        let entry = match followed {
            // A HEAD asks after a process without being one of its exchanges: it takes no
            // stage, and nothing of it is captured (its empty answer would replace a stage's).
            Some(seen) if ctx.asks_only => Some(seen),
            Some(seen) => Some(app.processes.advance(ctx.code, seen)),
            None if self.follow_ups => Some(app.processes.start(ctx.code, owner, company, utc_day)),
            // No route can follow this process up: the first exchange, not registered.
            None => None,
        };
        ctx.process = Some(match entry {
            Some(entry) => {
                ctx.stage = trace::stage_of(entry.exchanges - 1);
                ProcessRecord {
                    owner: entry.owner.to_string(),
                    company_key: entry.company_key.to_string(),
                    day: entry.day,
                    exchanges: entry.exchanges,
                }
            }
            None => {
                ctx.stage = trace::stage_of(0);
                ProcessRecord {
                    owner: owner.to_string(),
                    company_key: company.to_string(),
                    day: utc_day,
                    exchanges: 1,
                }
            }
        });
        ctx.forwarded = true;
        // What is left when the answer goes out (other calls may have settled meanwhile, or
        // the day turned): this call's points are still reserved, and an answer other than
        // 2xx gives them back once it ends, where they count in what is left.
        let call_day = ctx.lease.as_ref().map(|l| l.day());
        let after = |refunded: bool| {
            let (key, limits) = metered.as_ref()?;
            let now = Today::at(Utc::now().timestamp(), tz);
            let returned = call_day.filter(|_| refunded).map(|day| (day, call_points));
            app.ledger.remaining_returning(key, limits, now, returned)
        };
        let sent = Instant::now();
        let result = upstream::exchange(leg, session, req, body, |head, upstream_time| {
            let _ = head.insert_header(X_TRACECODE, &code);
            let proxy_time = started.elapsed().saturating_sub(upstream_time);
            // The upstream's own entries (its compute time, say) come first, then Tollgate's.
            let theirs = head
                .headers
                .get_all("server-timing")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter(|v| quotes_close(v));
            let timing = server_timing(theirs, proxy_time, upstream_time);
            let _ = head.insert_header(SERVER_TIMING, timing);
            let refunded = !(200..300).contains(&head.status.as_u16());
            for (k, v) in rate_limit_headers(after(refunded)) {
                let _ = head.insert_header(k, v);
            }
        })
        .await;
        match result {
            Ok(ex) => {
                metrics
                    .upstream_seconds
                    .observe(ex.upstream_time.as_secs_f64());
                ctx.status = ex.status;
                ctx.upstream_status = Some(ex.status);
                ctx.upstream_failed = ex.upstream_failed;
                if route.capture {
                    ctx.output = Some(Payload {
                        content_encoding: ex.content_encoding,
                        content_type: ex.content_type,
                        truncated: ex.capture_truncated,
                        body: ex.captured.freeze(),
                    });
                }
                match ex.held_end {
                    // The end of the answer waits for the settlement and the record, so what
                    // the caller saw is already charged and readable from /account/* once it
                    // ends.
                    Some(held) => {
                        let recorded = match self.settle_and_take_record(ctx) {
                            Some(record) => self.put_on_record(record).await,
                            None => true,
                        };
                        if !recorded {
                            // Strict durability, and the record is not on disk: the answer
                            // does not end as if it were.
                            ctx.broken_off = true;
                            return Ok(());
                        }
                        let ended =
                            upstream::end_response(session, ex.held_head, held, ex.deadline).await;
                        // Not taken in time: the connection goes, its answer unfinished.
                        ctx.broken_off |= !ended;
                    }
                    // Broken off: finish() settles it.
                    None => {
                        ctx.broken_off = true;
                        app.metrics
                            .upstream_errors
                            .with_label_values(&["aborted"])
                            .inc();
                        if ctx.upstream_failed {
                            tracing::warn!(
                                tracecode = %ctx.code,
                                upstream = %upstream_cfg.name,
                                status = ex.status,
                                "upstream broke off its answer after the head"
                            );
                        }
                    }
                }
                Ok(())
            }
            Err(failure) => {
                // Refund, and put the call on record with the status its caller gets, before
                // the caller hears of the failure.
                ctx.status = failure.status();
                if let Some(record) = self.settle_and_take_record(ctx) {
                    self.put_on_record(record).await;
                }
                app.metrics
                    .upstream_errors
                    .with_label_values(&[failure.kind()])
                    .inc();
                let message = match failure {
                    upstream::UpstreamFailure::Timeout => "the upstream did not answer in time",
                    upstream::UpstreamFailure::Connect => "the upstream is unreachable",
                    upstream::UpstreamFailure::Protocol => "the upstream broke the exchange",
                };
                // The time waited on the upstream counts as its own, as on an answer.
                let upstream_time = sent.elapsed();
                let proxy_time = started.elapsed().saturating_sub(upstream_time);
                tracing::warn!(
                    tracecode = %ctx.code,
                    upstream = %upstream_cfg.name,
                    kind = failure.kind(),
                    waited_ms = upstream_time.as_millis() as u64,
                    "upstream failed: {message}"
                );
                let mut headers = vec![(
                    "Server-Timing",
                    server_timing(std::iter::empty(), proxy_time, upstream_time),
                )];
                // Settled above: the ledger no longer counts the call's points.
                headers.extend(rate_limit_headers(after(false)));
                Err((ApiError::new(failure.status(), message), headers))
            }
        }
    }

    /// Step 9: settle, record, count.
    fn finish(&self, ctx: &mut Ctx) {
        let app = &self.app;
        let Some(route_index) = ctx.route else { return };
        let metrics = &app.metrics.routes[route_index];
        metrics.count(ctx.status);
        metrics
            .total_seconds
            .observe(ctx.started.elapsed().as_secs_f64());
        if let Some(record) = self.settle_and_take_record(ctx) {
            self.enqueue(record);
        }
    }

    /// Puts an answered call on record before its caller hears the end of the answer: durably
    /// (the charge or refund and the record on disk) with `durability = "strict"`, else handed
    /// to the writer.
    /// False when durability is strict and the record could not be made durable (it stays
    /// queued for the writer's next try).
    async fn put_on_record(&self, record: CallRecord) -> bool {
        if self.app.config.store.durability == crate::config::Durability::Strict {
            if let Err(e) = self.app.writer.record_durable(record).await {
                tracing::error!(error = %e, "strict record failed");
                return false;
            }
        } else {
            self.enqueue(record);
        }
        true
    }

    /// Hands a record to the store writer without waiting on the request path.
    fn enqueue(&self, record: CallRecord) {
        let app = &self.app;
        if let Err(full) = app.writer.try_record(record) {
            // Never drop audit: wait for room off the async workers.
            let writer = app.writer.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = writer.record_blocking(full.0) {
                    tracing::error!(error = %e, "audit record could not be stored");
                }
            });
        }
    }

    /// Settles the lease (commit on an upstream 2xx, else refund) and builds the call's record;
    /// `None` once done, or when the call never reached the upstream (nothing to record).
    fn settle_and_take_record(&self, ctx: &mut Ctx) -> Option<CallRecord> {
        let app = &self.app;
        let route: &Route = &app.config.routes[ctx.route?];
        let charged =
            !ctx.upstream_failed && ctx.upstream_status.is_some_and(|s| (200..300).contains(&s));
        let charged_day = ctx.lease.as_ref().map(|l| l.day());
        if let Some(lease) = ctx.lease.take() {
            lease.settle(charged);
        }
        // Calls sent on to the upstream are on record, with the upstream's status, or the one
        // Tollgate answered when the upstream failed (502, 504); calls refused before are not.
        let status = match ctx.upstream_status {
            Some(status) => status,
            None if ctx.forwarded => ctx.status,
            None => return None,
        };
        let process = ctx.process.take()?;
        let user = ctx.user.as_ref();
        let mut input = ctx.input.take();
        let mut output = ctx.output.take();
        if !route.redact.is_empty() {
            for p in [&mut input, &mut output].into_iter().flatten() {
                trace::redact(p, &route.redact, app.config.limits.max_capture_bytes);
            }
        }
        Some(CallRecord {
            audit: AuditRecord {
                code: ctx.code,
                username: user
                    .map(|u| u.username.clone())
                    .unwrap_or_else(|| trace::ANONYMOUS.into()),
                company_key: user
                    .map(|u| u.company_key.clone())
                    .unwrap_or_else(|| trace::ANONYMOUS.into()),
                service: route.service,
                operation: route.operation.to_string(),
                method_group: route.method_group,
                // The call's start, to the microsecond before rounding down to its millisecond:
                // never later than the millisecond a caller who has its answer reads at.
                time_ms: (Utc::now().timestamp_micros() - ctx.started.elapsed().as_micros() as i64)
                    .div_euclid(1000),
                timezone: user.map(|u| u.timezone).unwrap_or(0),
                points: ctx.points.points,
                unique_points: ctx.points.unique_points,
                duration_us: ctx.started.elapsed().as_micros() as u64,
                status,
            },
            findable: (route.capture || self.follow_ups) && !ctx.asks_only,
            anonymous: user.is_none(),
            process,
            stage: ctx.stage,
            input,
            output,
            charged_day: if charged {
                charged_day.or(Some(ctx.local_day))
            } else {
                None
            },
        })
    }
}

/// Appends a duration as milliseconds with three decimals ("1.235"), rounded to the
/// microsecond, with integer arithmetic: float formatting was a visible share of each call's
/// CPU, and this is written twice on every call.
fn push_ms(out: &mut String, d: Duration) {
    let us = (d.as_nanos() + 500) / 1000;
    out.push_str(itoa::Buffer::new().format(us / 1000));
    out.push('.');
    let fraction = (us % 1000) as u32;
    for digit in [fraction / 100, fraction / 10 % 10, fraction % 10] {
        out.push(char::from(b'0' + digit as u8));
    }
}

/// A process id as Tollgate issues tracecodes (lower-case, hyphenated). Other spellings of the
/// same UUID are refused rather than matched: the path goes upstream as the caller wrote it,
/// and the upstream knows the process by the spelling it was given.
fn canonical_tracecode(id: &str) -> Result<Uuid, ()> {
    let code = Uuid::try_parse(id).map_err(|_| ())?;
    let mut buf = Uuid::encode_buffer();
    if code.hyphenated().encode_lower(&mut buf) == id {
        Ok(code)
    } else {
        Err(())
    }
}

fn status_class(status: u16) -> &'static str {
    crate::metrics::STATUS_CLASSES[(status / 100).min(5) as usize]
}

/// The answer to a request head pingora could not read, by why: too large (431, 414), a
/// version other than HTTP/1.0 and 1.1 (505), else not HTTP (400).
fn unreadable_head_error(why: &pingora::Error) -> ApiError {
    let context = why.context.as_ref().map(|c| c.as_str()).unwrap_or_default();
    let cause = why.cause.as_deref();
    let parse = cause.and_then(|c| c.downcast_ref::<httparse::Error>());
    // Pingora names the target it could not take as a URI, without the reason; the http
    // crate takes none longer than this.
    const LONGEST_TARGET: usize = u16::MAX as usize - 1;
    let too_long_target = context
        .strip_prefix("invalid uri ")
        .is_some_and(|target| target.len() > LONGEST_TARGET);
    if context.starts_with("Request header larger than") {
        ApiError::new(431, "request head: larger than 1 MiB")
    } else if parse == Some(&httparse::Error::TooManyHeaders) {
        ApiError::new(431, "request head: more than 256 header fields")
    } else if parse == Some(&httparse::Error::Version) && names_a_version(context) {
        ApiError::new(505, "request: only HTTP/1.0 and HTTP/1.1 are served")
    } else if too_long_target {
        ApiError::new(414, "request target: longer than 65534 bytes")
    } else {
        ApiError::bad_request("request: not a valid HTTP/1.1 request head")
    }
}

/// Whether the request line pingora quotes (`buf: ...`, escaped) ends in a version of the
/// form `HTTP/d.d`: only then is a version it cannot read one it does not serve (505), not a
/// malformed line (400).
fn names_a_version(context: &str) -> bool {
    let quoted = context.strip_prefix("buf: ").unwrap_or_default();
    let quoted = quoted.strip_prefix('"').unwrap_or(quoted);
    let line = quoted.split("\\r").next().unwrap_or_default();
    let line = line.split("\\n").next().unwrap_or_default().as_bytes();
    matches!(line, [.., b' ', b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
        if major.is_ascii_digit() && minor.is_ascii_digit())
}

fn guess_service(path: &str) -> ServiceName {
    path.trim_start_matches('/')
        .split('/')
        .next()
        .and_then(|s| s.to_ascii_uppercase().parse().ok())
        .unwrap_or(ServiceName::ACCOUNT)
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

fn rejection_reason(r: &Rejection) -> &'static str {
    match r {
        Rejection::PointsPerRequest { .. } => "points_per_request",
        Rejection::PointsPerDay { .. } => "points_per_day",
        Rejection::PointsPerDateWindow { .. } => "points_per_date_window",
        Rejection::Concurrency { .. } => "max_concurrent_execution",
    }
}

fn rejection_error(r: &Rejection) -> ApiError {
    match r {
        Rejection::PointsPerRequest { limit, requested } => ApiError::payment_required(format!(
            "points_per_request: the request has {requested} points, the quota allows {limit} per request"
        )),
        Rejection::PointsPerDay { limit, used, requested, .. } => ApiError::payment_required(format!(
            "points_per_day: {used} of {limit} points used today, the request needs {requested}"
        )),
        Rejection::PointsPerDateWindow { limit, used, requested, window_days, .. } => ApiError::payment_required(format!(
            "points_per_date_window: {used} of {limit} points used in the last {window_days} days, the request needs {requested}"
        )),
        Rejection::Concurrency { limit, in_flight, retry_after_seconds } => ApiError::too_many(
            if *limit == 0 {
                "max_concurrent_execution: the quota allows no calls (0)".to_string()
            } else {
                format!("max_concurrent_execution: {in_flight} calls already in flight, the quota allows {limit}")
            },
            *retry_after_seconds,
        ),
    }
}

/// `Server-Timing`: the upstream's own entries, then Tollgate's time and the time waited on the
/// upstream.
fn server_timing<'a>(
    theirs: impl Iterator<Item = &'a str>,
    proxy_time: Duration,
    upstream_time: Duration,
) -> String {
    let mut timing = String::with_capacity(48);
    for entry in theirs {
        timing.push_str(entry);
        timing.push_str(", ");
    }
    timing.push_str("proxy;dur=");
    push_ms(&mut timing, proxy_time);
    timing.push_str(", upstream;dur=");
    push_ms(&mut timing, upstream_time);
    timing
}

/// Whether every quoted string in a header value ends: an upstream's `Server-Timing` with an
/// open quote would swallow Tollgate's own entries after it, so it is not passed on.
fn quotes_close(value: &str) -> bool {
    let mut quoted = false;
    let mut escaped = false;
    for b in value.bytes() {
        match (quoted, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (_, _, b'"') => quoted = !quoted,
            _ => {}
        }
    }
    !quoted
}

/// The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-11) for the tightest points
/// quota, named by the quota it is, so that one name always means one policy: `q` its points,
/// `w` its window in seconds; `r` the points left, `t` the seconds until some come back.
fn rate_limit_headers(
    remaining: Option<crate::quota::ledger::Remaining>,
) -> Vec<(&'static str, String)> {
    match remaining {
        Some(r) => {
            let name = if r.window_days > 1 {
                "\"points_per_date_window\""
            } else {
                "\"points_per_day\""
            };
            rate_limit_fields(
                name,
                r.limit,
                u64::from(r.window_days) * 86_400,
                r.remaining,
                r.reset_seconds,
            )
        }
        None => Vec::new(),
    }
}

/// The RateLimit fields of a route's `requests_per_second` limit, on the 429 it gives.
fn request_rate_headers(per_second: u32, wait_seconds: u64) -> Vec<(&'static str, String)> {
    rate_limit_fields(
        "\"requests_per_second\"",
        u64::from(per_second),
        1,
        0,
        wait_seconds,
    )
}

/// `RateLimit-Policy: NAME;q=QUOTA;w=WINDOW` and `RateLimit: NAME;r=LEFT;t=RESET` (NAME
/// quoted); written by hand, as they are on every metered call.
fn rate_limit_fields(
    name: &str,
    quota: u64,
    window_seconds: u64,
    left: u64,
    reset_seconds: u64,
) -> Vec<(&'static str, String)> {
    let mut number = itoa::Buffer::new();
    let mut policy = String::with_capacity(64);
    for part in [name, ";q=", number.format(quota), ";w="] {
        policy.push_str(part);
    }
    policy.push_str(number.format(window_seconds));
    let mut state = String::with_capacity(64);
    for part in [name, ";r=", number.format(left), ";t="] {
        state.push_str(part);
    }
    state.push_str(number.format(reset_seconds));
    vec![("RateLimit-Policy", policy), ("RateLimit", state)]
}

/// The largest body the account API reads (its requests are small JSON documents).
const ACCOUNT_BODY_LIMIT: usize = 1 << 20;

const BODY_BROKEN_OFF: &str =
    "body: broken off (malformed chunked encoding, or the client closed the connection)";

enum BodyError {
    TooLarge,
    /// Broken off, or malformed.
    Gone,
    /// Nothing arrived for `client_read_timeout_ms`.
    Stalled,
}

impl BodyError {
    /// The answer to a body that could not be read whole (not one too large).
    fn unread(&self, limits: &crate::config::Limits) -> ApiError {
        match self {
            // RFC 9110 15.5.9: the request did not arrive within the time the server waits.
            BodyError::Stalled => ApiError::new(
                408,
                format!(
                    "body: nothing arrived for client_read_timeout_ms ({} ms)",
                    limits.client_read_timeout.as_millis()
                ),
            ),
            _ => ApiError::bad_request(BODY_BROKEN_OFF),
        }
    }
}

/// What makes a request head that pingora read unfit to be served, if anything.
fn head_problem(req: &RequestHeader) -> Option<&'static str> {
    let host = req.headers.get(http::header::HOST);
    if req.version >= http::Version::HTTP_11 && host.is_none() {
        // RFC 9112 3.2: a server must answer 400 to an HTTP/1.1 request without Host.
        return Some("Host: an HTTP/1.1 request must carry one");
    }
    if req
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        // One credential per request: a proxy in front that read the last where Tollgate reads
        // the first would authorize one identity while Tollgate serves another.
        return Some("Authorization: must be sent once");
    }
    if host.is_some_and(|h| !is_host_value(h.as_bytes())) {
        // RFC 9112 3.2: nor to one whose Host is not a host (and port).
        return Some("Host: not a host name or address, with an optional port");
    }
    if req.method != http::Method::CONNECT && !is_request_target(req) {
        // RFC 9112 3.2: origin form, absolute form, or `*` for OPTIONS. Pingora would route
        // "GET zz/x" or "GET ?x" as "/" (and percent-encodes what a target may not hold).
        return Some("request target: must be a path starting with '/' or an absolute http URI");
    }
    let chunked_twice = upstream::list_items(&req.headers, http::header::TRANSFER_ENCODING)
        .filter(|c| c.eq_ignore_ascii_case(b"chunked"))
        .nth(1)
        .is_some();
    if chunked_twice {
        // RFC 9112 6.1: chunked is applied once; twice is a malformed body, not a coding
        // Tollgate does not know (501).
        return Some("Transfer-Encoding: chunked must be applied only once");
    }
    let path = req.uri.path();
    if !path.starts_with("/account/") && has_dot_segment(path) {
        // Routes match the path as sent; an upstream that resolves "..", as most do, would
        // serve another route's path under this one's rules. (The account API resolves
        // nothing: such a path is simply not one of its resources, a 404.)
        return Some("path: dot segments ('.' and '..', also percent-encoded) are not allowed");
    }
    None
}

/// Whether the request target is in one of the forms a request other than CONNECT may use.
fn is_request_target(req: &RequestHeader) -> bool {
    let target = req.raw_path();
    let starts = |scheme: &[u8]| {
        target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme)
    };
    target.first() == Some(&b'/')
        || starts(b"http://")
        || starts(b"https://")
        || (target == b"*" && req.method == http::Method::OPTIONS)
}

/// Whether the request's Transfer-Encoding names a coding besides one `chunked`.
fn has_other_coding(req: &RequestHeader) -> bool {
    upstream::transfer_coding(&req.headers) == upstream::TransferCoding::Other
}

/// RFC 3986 `host [ ":" port ]`: an IP literal in brackets, or a reg-name or IPv4 address
/// (unreserved, percent-encoded and sub-delimiter bytes), then an optional port of digits.
fn is_host_value(value: &[u8]) -> bool {
    let (host_ok, port) = match value {
        [b'[', rest @ ..] => match rest.iter().position(|&b| b == b']') {
            Some(end) => (
                end > 0
                    && rest[..end]
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b":.%-_~".contains(&b)),
                &rest[end + 1..],
            ),
            None => return false,
        },
        _ => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            (
                value[..end]
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b)),
                &value[end..],
            )
        }
    };
    host_ok
        && match port {
            [] => true,
            [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
            _ => false,
        }
}

/// Whether a segment of `path` is "." or "..", as an upstream might resolve it: dots spelled
/// with or without percent-encoding, segments also ended by an encoded slash or a backslash
/// (raw or encoded), and by a ';' parameter (as Java servers read "..;").
pub(crate) fn has_dot_segment(path: &str) -> bool {
    let path = path.as_bytes();
    if !path.iter().any(|&b| b == b'.' || b == b'%') {
        return false;
    }
    let mut dots = 0;
    // Within a segment: only dots so far; after a ';', the rest is a parameter.
    let (mut only_dots, mut in_parameter) = (true, false);
    let mut i = 0;
    loop {
        let separator = match &path[i..] {
            [] => Some(0),
            [b'/' | b'\\', ..] => Some(1),
            [b'%', b'2', f, ..] if f | 0x20 == b'f' => Some(3),
            [b'%', b'5', c, ..] if c | 0x20 == b'c' => Some(3),
            _ => None,
        };
        if let Some(width) = separator {
            if only_dots && matches!(dots, 1 | 2) {
                return true;
            }
            if width == 0 {
                return false;
            }
            (dots, only_dots, in_parameter) = (0, true, false);
            i += width;
            continue;
        }
        match &path[i..] {
            _ if in_parameter => i += 1,
            [b'.', ..] => {
                dots += 1;
                i += 1;
            }
            [b'%', b'2', e, ..] if e | 0x20 == b'e' => {
                dots += 1;
                i += 3;
            }
            [b';', ..] => {
                in_parameter = true;
                i += 1;
            }
            _ => {
                only_dots = false;
                i += 1;
            }
        }
    }
}

/// Whether the caller waits for `100 Continue` before sending its body. An HTTP/1.0 caller is
/// never sent one (RFC 9110 10.1.1 and 15.2: it would take the 100 for the answer).
fn expects_continue(req: &RequestHeader) -> bool {
    req.version >= http::Version::HTTP_11
        && upstream::list_items(&req.headers, http::header::EXPECT)
            .any(|e| e.eq_ignore_ascii_case(b"100-continue"))
}

/// Reads the whole request body, refusing (without reading on) once it passes `limit`;
/// `whole`: it will be needed in one piece; `counting`: its points are counted as it arrives
/// (with `whole`).
async fn read_body(
    session: &mut Session,
    limit: usize,
    whole: bool,
    mut counting: Option<&mut PointsCount>,
) -> Result<RequestBody, BodyError> {
    let req = session.req_header();
    let declared = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let expects_continue = expects_continue(req);
    if session.is_body_empty() {
        return Ok(RequestBody::default());
    }
    if expects_continue {
        // Pingora would close the connection after answering before the body was read; the
        // body is read here in full, so the connection stays reusable.
        session.set_close_on_response_before_downstream_finish(false);
        let sent = session.write_continue_response().await;
        session.set_close_on_response_before_downstream_finish(true);
        sent.map_err(|_| BodyError::Gone)?;
    }
    let mut body = if whole {
        RequestBody::joining(declared)
    } else {
        RequestBody::default()
    };
    while let Some(piece) = session.read_request_body().await.map_err(|e| {
        if *e.etype() == pingora::ErrorType::ReadTimedout {
            BodyError::Stalled
        } else {
            BodyError::Gone
        }
    })? {
        if body.len() + piece.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.push(piece);
        if let Some(counting) = counting.as_deref_mut() {
            counting.feed(body.received());
        }
    }
    body.finish();
    Ok(body)
}

/// How long a connection accepted while draining may take to send its request head.
const DRAINING_HEAD_WAIT: Duration = Duration::from_secs(2);

/// How long, and for how many bytes, a connection answered 413 keeps reading what its client
/// is still sending before it closes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 << 20;

/// After an answer given before the body was read (a 413, a rejection): reads and drops what
/// the client goes on sending, for a moment, so that its writes do not meet a closed socket
/// (a reset, which can discard the answer before the client reads it). A client that sent
/// `Expect: 100-continue`
/// was never asked for the body, and sends none.
async fn linger(session: &mut Session) {
    if expects_continue(session.req_header()) {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        match pingora::time::timeout(left, session.read_request_body()).await {
            Ok(Ok(Some(piece))) => drained += piece.len(),
            _ => break,
        }
    }
}

/// Writes a complete local answer with its length, so the connection stays reusable.
async fn respond(
    session: &mut Session,
    status: u16,
    content_type: &str,
    code: &Uuid,
    headers: &[(&str, String)],
    body: Bytes,
) -> pingora::Result<()> {
    let mut head = ResponseHeader::build(status, Some(4 + headers.len()))?;
    head.insert_header("Content-Type", content_type)?;
    head.insert_header("Content-Length", body.len().to_string())?;
    head.insert_header("X-Tracecode", code.to_string())?;
    for (k, v) in headers {
        head.insert_header(k.to_string(), v.as_str())?;
    }
    session.write_response_header(Box::new(head)).await?;
    // In pieces: the write timeout (client_read_timeout_ms) is then a bound on each piece
    // taken, not on a whole download, so a slow reader that keeps reading is not cut off.
    let mut rest = body;
    while rest.len() > RESPONSE_PIECE {
        let piece = rest.split_to(RESPONSE_PIECE);
        session.write_response_body(piece, false).await?;
    }
    session.write_response_body(rest, true).await
}

/// The size of the pieces a local answer's body is written in.
const RESPONSE_PIECE: usize = 64 << 10;

impl Tollgate {
    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            code: trace::new_tracecode(),
            route: None,
            user: None,
            lease: None,
            points: Points::default(),
            stage: 0,
            process: None,
            input: None,
            output: None,
            upstream_status: None,
            upstream_failed: false,
            forwarded: false,
            broken_off: false,
            body_broken: false,
            asks_only: false,
            status: 0,
            local_day: 0,
            _in_flight: None,
        }
    }

    /// An answer written once the drain has begun says `Connection: close`, also for a call
    /// that began before it: the connection will not be read again.
    fn close_if_draining(&self, session: &mut Session) {
        if self.app.draining.is_set() {
            session.set_keepalive(None);
        }
    }

    /// Answers one call whose request head has been read.
    async fn handle(&self, session: &mut Session, ctx: &mut Ctx) {
        let client_timeout = self.app.config.limits.client_read_timeout;
        session.set_read_timeout(Some(client_timeout));
        // And the other way: a caller that stops taking its answer (an account API download,
        // say) does not hold its connection past one such wait per write.
        session.set_write_timeout(Some(client_timeout));
        // RFC 9112 9.3.2: requests a caller sends before reading the answers are answered in
        // order on the same connection (pingora otherwise closes it after the first answer and
        // drops the rest).
        session.set_pipelining_enabled(true);
        let refused = |reason: &str| {
            self.app
                .metrics
                .rejections
                .with_label_values(&[reason])
                .inc()
        };
        if let Some(problem) = head_problem(session.req_header()) {
            refused("bad_request_head");
            session.set_keepalive(None);
            self.reject(session, ctx, ApiError::bad_request(problem), &[])
                .await;
        } else if has_other_coding(session.req_header()) {
            // RFC 9112 6.1: a coding the server does not know is a 501; passing the body on
            // without it would hand the upstream encoded bytes as they were plain.
            refused("unsupported_transfer_coding");
            session.set_keepalive(None);
            let error = ApiError::new(501, "Transfer-Encoding: only chunked is supported");
            self.reject(session, ctx, error, &[]).await;
        } else if session.req_header().method == http::Method::CONNECT {
            // No tunnels: and a CONNECT's framing differs from other requests', so the
            // connection is not read on.
            refused("connect");
            session.set_keepalive(None);
            let error = ApiError::new(405, "method: CONNECT is not served");
            let allow = self.allowed_methods(session.req_header().uri.path());
            self.reject(session, ctx, error, &[("Allow", allow)]).await;
        } else if session.req_header().method == http::Method::TRACE {
            // A TRACE echoes the request, credentials and cookies included, to whatever
            // script can read the answer (as nginx, it is not served).
            refused("trace");
            session.set_keepalive(None);
            let error = ApiError::new(405, "method: TRACE is not served");
            let allow = self.allowed_methods(session.req_header().uri.path());
            self.reject(session, ctx, error, &[("Allow", allow)]).await;
        } else if session.req_header().uri.path().starts_with("/account/") {
            self.serve_account(session, ctx).await;
        } else if let Err((error, headers)) = self.proxy_call(session, ctx).await {
            self.reject(session, ctx, error, &headers).await;
        }
        // An answer given before the body was read (a 404, 401, 413...) closes the connection;
        // the body still coming is read and dropped for a moment first.
        if !ctx.body_broken && !session.is_body_done() {
            linger(session).await;
        }
    }

    /// Answers a request whose head could not be read as HTTP/1.1, in the API's error shape.
    async fn reject_unreadable(&self, session: &mut Session, ctx: &mut Ctx, why: &pingora::Error) {
        let error = unreadable_head_error(why);
        self.app
            .metrics
            .rejections
            .with_label_values(&["unreadable_request_head"])
            .inc();
        session.set_keepalive(None);
        // No head was read: no path to guess the service from.
        self.reject_as(
            session,
            ctx,
            error,
            ServiceName::ACCOUNT,
            "read_request",
            &[],
        )
        .await;
    }
}

/// Coded request bodies decoded at once (each up to `max_body_bytes` decoded).
const CODED_BODIES_AT_ONCE: usize = 4;

#[async_trait]
impl HttpServerApp for Tollgate {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let keepalive = Duration::from_secs(self.app.config.server.keepalive_timeout_seconds);
        let accepted = session
            .digest()
            .and_then(|d| d.timing_digest.first().cloned().flatten())
            .map(|t| t.established_ts);
        let _active = self.app.draining.enter();
        let grace = Duration::from_secs(self.app.config.server.grace_period_seconds);
        if accepted.is_some_and(|at| self.app.draining.closed_to_new_by(at, grace)) {
            // Accepted after the grace period: the listener is closing, the caller retries
            // elsewhere.
            return None;
        }
        let read = if accepted.is_some_and(|at| self.app.draining.had_begun_by(at)) {
            // A connection accepted while draining (the listener stays open for the grace
            // period): its request is read, for a moment, and answered with Connection: close.
            match pingora::time::timeout(keepalive.min(DRAINING_HEAD_WAIT), session.read_request())
                .await
            {
                Ok(read) => read,
                Err(_) => return None,
            }
        } else {
            tokio::select! {
            // Biased: a request already buffered is served rather than dropped.
            biased;
            // One deadline for the wait and the whole head. Pingora has none for an HTTP/1.1
            // connection that names no keep-alive timeout, and applies its own to each read,
            // so an idle caller, or a head trickled in a byte at a time, would hold the
            // connection without end.
            read = pingora::time::timeout(keepalive, session.read_request()) => match read {
                Ok(read) => read,
                Err(_) => return None,
            },
            // A connection waiting for its next request is closed at shutdown.
            _ = self.app.draining.wait() => return None,
            }
        };
        match read {
            Ok(true) => {}
            // The client closed the connection between requests.
            Ok(false) => return None,
            Err(e) => {
                if matches!(e.etype(), pingora::ErrorType::InvalidHTTPHeader) {
                    let mut ctx = self.new_ctx();
                    self.reject_unreadable(&mut session, &mut ctx, &e).await;
                }
                session.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() || self.app.draining.is_set() {
            session.set_keepalive(None);
        }
        let mut ctx = self.new_ctx();
        self.handle(&mut session, &mut ctx).await;
        self.finish(&mut ctx);
        if ctx.broken_off {
            // The answer broke off after its head was sent: the connection is dropped, so the
            // caller cannot take a cut answer for a whole one (ending the body would send a
            // chunked answer's last chunk).
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        session
            .finish()
            .await
            .ok()
            .flatten()
            .map(|stream| ReusedHttpStream::from_reusable_stream(stream, settings))
    }

    async fn http_cleanup(&self) {
        self.app.draining.begin();
    }
}

#[cfg(test)]
mod timing_tests {
    use super::*;

    #[test]
    fn an_upstream_server_timing_with_an_open_quote_is_not_passed_on() {
        for (value, closes) in [
            ("db;dur=53", true),
            ("db;desc=\"a, b\";dur=1", true),
            ("db;desc=\"esc \\\" q\"", true),
            ("db;dur=53, \"bad", false),
            ("db;desc=\"open \\\"", false),
        ] {
            assert_eq!(quotes_close(value), closes, "{value}");
        }
    }

    #[test]
    fn server_timing_durations_print_as_milliseconds_with_three_decimals() {
        for (nanos, want) in [
            (0, "0.000"),
            (12_000, "0.012"),
            (999_499, "0.999"),
            (1_234_567, "1.235"),
            (200_000_000, "200.000"),
            (3_600_000_000_499, "3600000.000"),
            (1_000_500, "1.001"),
            (10_099_600, "10.100"),
        ] {
            let mut out = String::new();
            push_ms(&mut out, Duration::from_nanos(nanos));
            assert_eq!(out, want);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_in_any_spelling() {
        for path in [
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/..",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/.%2e",
            "/a/%2e/b",
            "/a/..;/b",
            "/a/..;jsessionid=1/b",
            "/a/..%2fb",
            "/a/..%2Fb",
            "/a\\..\\b",
            "/a/%5c..%5cb",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/",
            "/a/b",
            "/a/.../b",
            "/a/..b/c",
            "/a/b.c",
            "/a/%2ex",
            "/a/%2f",
            "/.well-known/x",
            "/a/x;..",
            "/a/b;v=1.2",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn transfer_codings_besides_one_chunked_are_found() {
        let with = |values: &[&str]| {
            let mut req = RequestHeader::build("POST", b"/", None).unwrap();
            for v in values {
                req.append_header("Transfer-Encoding", *v).unwrap();
            }
            has_other_coding(&req)
        };
        assert!(!with(&[]));
        assert!(!with(&["chunked"]));
        assert!(!with(&[" CHUNKED "]));
        assert!(!with(&[", chunked"]));
        assert!(!with(&["", "chunked"]));
        // An empty element after `chunked`: pingora would not read the body as chunked.
        for values in [
            &["chunked,"][..],
            &["chunked , "],
            &["chunked,,"],
            &[" CHUNKED ", ""],
        ] {
            assert!(with(values), "{values:?}");
        }
        assert!(with(&["gzip, chunked"]));
        assert!(with(&["chunked, chunked"]));
        assert!(with(&["gzip", "chunked"]));
        assert!(with(&["identity"]));
    }

    #[test]
    fn host_values_are_a_host_and_an_optional_port() {
        for host in [
            "example.com",
            "127.0.0.1:8080",
            "[::1]:80",
            "a-b_c~d",
            "x%41",
        ] {
            assert!(is_host_value(host.as_bytes()), "{host}");
        }
        // RFC 9112 3.2: empty when the target has no authority.
        assert!(is_host_value(b""));
        for host in [
            "x y", "x/evil", "a@b", "x?y", "x#y", "x\\y", "x\ty", "x:abc", "[::1", "x:80:80", "[]",
            "[::1]x",
        ] {
            assert!(!is_host_value(host.as_bytes()), "{host}");
        }
    }
}
