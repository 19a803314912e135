//! Wiring: opens the store, builds the shared state, and runs the pingora server with its
//! services (the proxy, the metrics listener, the optional demo upstream, and the background
//! upkeep: lease reaping and retention). SIGTERM drains calls in flight, then the store
//! writer is flushed and the process exits 0 (1 when calls could not be put on record).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service as ListeningService;

use crate::app::App;
use crate::auth::{self, Authority, Keys};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Tollgate;
use crate::quota::ledger::Ledger;
use crate::quota::Quotas;
use crate::store::writer::StoreWriter;
use crate::store::Store;
use crate::trace::ProcessRegistry;

/// Builds the shared state from a validated config (opens the store, seeds users).
pub fn build_app(config: Config) -> Result<(Arc<App>, std::thread::JoinHandle<()>), String> {
    let config = Arc::new(config);
    let store = Store::open(&config.store.path)
        .map_err(|e| format!("{e} (store.path: {})", config.store.path.display()))?;
    let secret = auth::load_secret(&config.auth)?;
    let previous: Vec<Vec<u8>> = config
        .auth
        .previous_secrets
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    auth::seed_users(&store, &config.users)?;
    let authority = Authority::new(Keys::new(&secret, &previous), store.clone(), &config.auth)?;
    let (writer, writer_thread) = StoreWriter::start(
        store.clone(),
        config.store.flush_interval,
        config.store.queue_capacity,
        config.store.durability == crate::config::Durability::Strict,
    );
    let app = Arc::new(App {
        quotas: Quotas::from_config(&config),
        ledger: Arc::new(Ledger::new(config.store.lease_ttl)),
        processes: ProcessRegistry::default(),
        metrics: Metrics::new(&config.routes),
        authority,
        store,
        writer,
        config,
        started: Instant::now(),
        draining: Default::default(),
    });
    let restored = app.restore_ledger()?;
    tracing::info!(restored, "ledger restored from the store");
    Ok((app, writer_thread))
}

/// Serves `/metrics` in the Prometheus text format.
struct MetricsApp(Arc<App>);

/// The metrics port keeps the proxy port's deadlines (pingora's stock HTTP app has none for a
/// head or an answer, so a few hundred connections trickling bytes held it, and the process's
/// file descriptors, for good), and answers a head it cannot read with a 400 instead of
/// writing the head, however long, to the log.
#[async_trait]
impl HttpServerApp for MetricsApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let config = &self.0.config;
        let keepalive = Duration::from_secs(config.server.keepalive_timeout_seconds);
        session.set_read_timeout(Some(config.limits.client_read_timeout));
        session.set_write_timeout(Some(config.limits.client_read_timeout));
        let read = tokio::select! {
            read = pingora::time::timeout(keepalive, session.read_request()) => read.ok()?,
            _ = self.0.draining.wait() => return None,
        };
        let response = match read {
            Ok(true) => self.response(&session),
            // Closed between requests.
            Ok(false) => return None,
            Err(_) => {
                session.set_keepalive(None);
                plain(400, "bad request\n")
            }
        };
        if *shutdown.borrow() || self.0.draining.is_set() {
            session.set_keepalive(None);
        }
        // Requests sent before the answers are read are answered in order, as on the proxy's
        // port (pingora would close the connection and drop them).
        session.set_pipelining_enabled(true);
        let (parts, body) = response.into_parts();
        let head = Box::new(ResponseHeader::from(parts));
        session.write_response_header(head).await.ok()?;
        session
            .write_response_body(bytes::Bytes::from(body), true)
            .await
            .ok()?;
        let settings = HttpPersistentSettings::for_session(&session);
        let stream = session.finish().await.ok()??;
        Some(ReusedHttpStream::from_reusable_stream(stream, settings))
    }
}

/// A short text answer; every answer says its length, so the connection serves the next one.
fn plain(status: u16, text: &str) -> http::Response<Vec<u8>> {
    let mut r = http::Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header("content-length", text.len());
    if status == 405 {
        r = r.header("allow", "GET, HEAD");
    }
    r.body(text.as_bytes().to_vec()).expect("static response")
}

impl MetricsApp {
    fn response(&self, session: &ServerSession) -> http::Response<Vec<u8>> {
        let app = &self.0;
        let head = session.req_header();
        if head.uri.path() != "/metrics" {
            return plain(404, "see /metrics\n");
        }
        let is_head = head.method == http::Method::HEAD;
        if head.method != http::Method::GET && !is_head {
            return plain(405, "GET /metrics\n");
        }
        app.metrics.store_queue.set(app.writer.queued() as i64);
        let body = app.metrics.render();
        http::Response::builder()
            .status(200)
            .header("content-type", prometheus::TEXT_FORMAT)
            .header("content-length", body.len())
            .body(if is_head { Vec::new() } else { body })
            .expect("static response")
    }
}

/// Reaps leases whose release was lost, drops expired day partitions, samples store size.
struct Upkeep(Arc<App>);

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let app = &self.0;
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        let mut retention = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = reap.tick() => {
                    let reaped = app.ledger.reap_expired(Instant::now());
                    // Committed points reach the store with each call's record (statistics),
                    // so the ledger's own change list is only drained here, not persisted.
                    drop(app.ledger.take_dirty());
                    if reaped > 0 {
                        tracing::warn!(reaped, "leases expired without settlement; their slots are free again");
                    }
                }
                _ = retention.tick() => {
                    let app = app.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        let today = Store::now_day();
                        let s = &app.config.store;
                        match app.store.drop_days_before(today - s.payload_retention_days as i32, today - s.audit_retention_days as i32) {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(dropped = n, "retention removed day partitions"),
                            Err(e) => tracing::error!(error = %e, "retention failed"),
                        }
                        app.metrics.store_bytes.set(app.store.disk_bytes() as i64);
                    })
                    .await;
                }
            }
        }
    }
}

/// The admin socket: `tollgate user ...` reaches a running server through it.
struct AdminSocket(Arc<App>);

#[async_trait]
impl BackgroundService for AdminSocket {
    async fn start(&self, shutdown: ShutdownWatch) {
        let app = self.0.clone();
        let run: crate::admin::Runner = Arc::new(move |command| {
            let answer = app
                .authority
                .write_directly(|store| crate::admin::apply(store, &command))
                .and_then(|result| result)?;
            if let crate::admin::UserCommand::SetQuota {
                username, values, ..
            } = &command
            {
                // A widened date window counts the days it newly covers at once.
                if let Some(days) = values.date_window_days {
                    app.restore_account(username, days)?;
                }
            }
            Ok(answer)
        });
        crate::admin::serve_socket(run, self.0.config.store.path.clone(), shutdown).await;
    }
}

/// How long the exit waits for the store writer to write what it holds.
const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(30);

/// SIGTERM: for `grace_period_seconds` the listener keeps accepting (a load balancer has time
/// to see the drain) and new calls are answered with `Connection: close`; then connections
/// accepted later are closed unanswered, and the calls in flight get up to
/// `shutdown_timeout_seconds` to finish before pingora shuts its runtimes down, which would
/// cancel them. SIGINT (Ctrl-C) drains the same way without the grace period: no load balancer
/// watches a terminal. A second SIGINT, or one during a SIGTERM drain, stops at once; SIGQUIT
/// upgrades.
struct DrainThenStop {
    app: Arc<App>,
    grace: Duration,
    timeout: Duration,
}

#[async_trait]
impl pingora::server::ShutdownSignalWatch for DrainThenStop {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        use pingora::server::ShutdownSignal;
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            return std::future::pending().await;
        };
        // Biased: of signals that came together, SIGINT (an operator at the terminal) wins.
        // Two SIGINTs before this task runs are one to tokio: that is a drain.
        let (name, grace) = tokio::select! {
            biased;
            _ = int.recv() => ("SIGINT", Duration::ZERO),
            _ = term.recv() => ("SIGTERM", self.grace),
            _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
        };
        self.app.draining.begin();
        if !grace.is_zero() {
            tracing::info!(?grace, "{name}: accepting for the grace period");
        }
        let drain = async {
            tokio::time::sleep(grace).await;
            let deadline = Instant::now() + self.timeout;
            tracing::info!(
                active = self.app.draining.active(),
                "{name}: draining requests in progress"
            );
            // Every request being read or served, account API included: pingora's shutdown
            // after this cancels whatever still runs.
            while self.app.draining.active() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let left = self.app.draining.active();
            if left > 0 {
                tracing::warn!(
                    active = left,
                    timeout = ?self.timeout,
                    "{name}: shutdown_timeout_seconds passed; requests still in progress are cut"
                );
            }
        };
        // SIGINT still stops at once while the drain waits.
        tokio::select! {
            _ = drain => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => {
                tracing::warn!(
                    active = self.app.draining.active(),
                    "SIGINT during the drain: stopping at once"
                );
                // Not pingora's fast shutdown: that stops the runtimes with the listeners still
                // accepting, and a listener whose socket's runtime is already gone spins on the
                // failing accept() (millions of "Accept() failed" lines) and holds the exit for
                // good. Its graceful one closes the listeners first, then gives what still runs
                // graceful_shutdown_timeout_seconds (1) before cutting it: the drain is skipped.
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}

/// Raises the soft limit on open files to the hard one, as servers do: at a common soft limit
/// of 1024, a thousand idle callers took every descriptor, and the store's writes failed with
/// them (every metered call a 503 until they left).
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let soft = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            tracing::info!(from = soft, to = limit.rlim_max, "open files limit raised");
        }
    }
}

/// Runs Tollgate until SIGTERM or SIGINT (both drain; see [`DrainThenStop`]).
pub fn serve(config: Config) -> Result<(), String> {
    // Bind failures must stop the start with a clear message, not leave a silent process.
    for (what, addr) in [
        ("server.listen", Some(config.server.listen)),
        ("metrics.listen", config.metrics_listen),
        (
            "demo_upstream.listen",
            config.demo_upstream.as_ref().map(|d| d.listen),
        ),
    ] {
        if let Some(addr) = addr {
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("{what}: cannot listen on {addr}: {e}"))?;
        }
    }
    raise_open_files_limit();
    let server_cfg = config.server.clone();
    let (app, writer_thread) = build_app(config)?;
    let conf = ServerConf {
        threads: server_cfg.threads,
        // Both phases of the drain happen before pingora's own shutdown (`DrainThenStop`):
        // by then no call is left to wait for.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        // One single-threaded runtime per worker thread, connections spread over them: no
        // work-stealing bookkeeping on every wake-up, about 15 % less CPU per proxied call
        // (benches/load). A connection stays on its thread for its whole life.
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = ListeningService::new("tollgate".into(), Tollgate::new(app.clone()));
    proxy.add_tcp(&server_cfg.listen.to_string());
    proxy.threads = Some(server_cfg.threads);
    server.add_service(proxy);

    if let Some(addr) = app.config.metrics_listen {
        let mut metrics = ListeningService::new("metrics".into(), MetricsApp(app.clone()));
        metrics.add_tcp(&addr.to_string());
        metrics.threads = Some(1);
        server.add_service(metrics);
    }
    if let Some(demo) = &app.config.demo_upstream {
        server.add_service(crate::demo::demo_service(
            &demo.listen.to_string(),
            crate::demo::DemoConfig {
                compute_time: demo.compute_time,
            },
            1,
        ));
    }
    server.add_service(background_service("upkeep", Upkeep(app.clone())));
    server.add_service(background_service("admin-socket", AdminSocket(app.clone())));
    tracing::info!(listen = %server_cfg.listen, server = %server_cfg.name, "tollgate serving");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainThenStop {
            app: app.clone(),
            grace: Duration::from_secs(server_cfg.grace_period_seconds),
            timeout: Duration::from_secs(server_cfg.shutdown_timeout_seconds),
        }),
    });

    // Calls have drained; write what the writer still holds before exiting.
    // Bounded: a writer whose batches keep failing must not hold the exit; what it could not
    // write is named in the log.
    let flushed = app.writer.flush_blocking(FINAL_FLUSH_WAIT);
    if let Err(e) = &flushed {
        tracing::error!(error = %e, "final store flush failed");
    }
    let _ = app.store.sync();
    drop(app);
    drop(writer_thread);
    tracing::info!("tollgate stopped");
    // A supervisor must be able to tell an exit that lost records from a clean one.
    flushed.map_err(|e| format!("stopped with calls not on record: {e}"))
}
