//! Idle upstream connections, kept by Tollgate per upstream.
//!
//! Pingora's own pool watches every idle connection with a task of its own: each release
//! spawns one, each reuse wakes it and waits for it to let go, and each reuse asks the kernel
//! for the peer's address (`getpeername`) to check that the descriptor still names the peer.
//! On the pass-through path that was about 4 % of a call's CPU. Here an idle connection is a
//! stream in a per-upstream stack: the most recently used is taken first (warm, and the
//! oldest age out at the bottom). A connection the upstream closed while idle is found by one
//! read that must not complete (the upstream never speaks first; the same test pingora's pool
//! makes), when it is taken, and by one task per upstream that tests them all every second and
//! closes those closed or aged out.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pingora::connectors::TransportConnector;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::Stream;
use pingora::upstreams::peer::HttpPeer;
use tokio::io::{AsyncRead, ReadBuf};

/// How often a task tests all idle connections of an upstream, so those the upstream closed
/// (or that aged out) do not hold descriptors while no call comes.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Idle connections, oldest first; taken from the back.
type Idle = VecDeque<(Stream, Instant)>;

/// One upstream: its address and options, and its idle connections.
pub struct Upstream {
    peer: HttpPeer,
    max_idle: usize,
    idle_timeout: Duration,
    idle: Arc<Mutex<Idle>>,
    /// The sweeping task, started when the first connection is kept.
    sweeper: Once,
}

impl Upstream {
    pub fn new(peer: HttpPeer, max_idle: usize, idle_timeout: Duration) -> Upstream {
        Upstream {
            peer,
            max_idle,
            idle_timeout,
            idle: Arc::new(Mutex::new(VecDeque::new())),
            sweeper: Once::new(),
        }
    }

    /// An idle connection (`true`), else a new one.
    pub async fn stream(&self, transport: &TransportConnector) -> pingora::Result<(Stream, bool)> {
        if let Some(stream) = self.take_idle() {
            return Ok((stream, true));
        }
        Ok((self.connect(transport).await?, false))
    }

    /// A new connection.
    pub async fn connect(&self, transport: &TransportConnector) -> pingora::Result<Stream> {
        transport.new_stream(&self.peer).await
    }

    /// An HTTP/1 client session on `stream`.
    pub fn session(&self, stream: Stream) -> HttpSession {
        HttpSession::H1(Http1Session::new_with_options(stream, &self.peer))
    }

    fn take_idle(&self) -> Option<Stream> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while let Some((mut stream, since)) = idle.pop_back() {
            if now.duration_since(since) >= self.idle_timeout {
                // The newest has aged out, so have all below it.
                idle.clear();
                return None;
            }
            if still_open(&mut stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Gives the connection back for reuse when its exchange left it reusable (the response
    /// read whole, keep-alive on both sides); otherwise it is closed.
    pub async fn release(&self, session: HttpSession) {
        let HttpSession::H1(mut h1) = session else {
            return;
        };
        h1.respect_keepalive();
        let Some(mut stream) = h1.reuse().await else {
            return;
        };
        if self.max_idle == 0 || !still_open(&mut stream) {
            return;
        }
        self.sweeper.call_once(|| self.start_sweeper());
        let mut idle = self.idle.lock();
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back((stream, Instant::now()));
    }

    /// Every `SWEEP_EVERY`, closes the idle connections that aged out or that the upstream
    /// closed; ends with the upstream.
    fn start_sweeper(&self) {
        let idle = Arc::downgrade(&self.idle);
        let timeout = self.idle_timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(idle) = idle.upgrade() else { return };
                let now = Instant::now();
                idle.lock().retain_mut(|(stream, since)| {
                    now.duration_since(*since) < timeout && still_open(stream)
                });
            }
        });
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }
}

/// Whether an idle connection may carry a request: a read must find nothing to read. The
/// stream's readiness is kept by the runtime, so on a quiet connection this is no system call.
fn still_open(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    // Outside the runtime's cooperative budget: a read refused for budget would look quiet.
    let mut probe = tokio::task::unconstrained(std::future::poll_fn(|cx| {
        Pin::new(&mut *stream).poll_read(cx, &mut buf)
    }));
    matches!(Pin::new(&mut probe).poll(&mut cx), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn upstream(addr: std::net::SocketAddr, max_idle: usize, idle: Duration) -> Upstream {
        Upstream::new(HttpPeer::new(addr, false, String::new()), max_idle, idle)
    }

    /// A server that answers every request on a connection with a small 200, counting the
    /// connections it accepted.
    async fn server() -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, count) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                accepted.send(()).unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") => {
                                let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                                if conn.write_all(reply).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
        (addr, count)
    }

    /// One GET on a connection taken from (or opened by) `up`; whether it was reused.
    async fn get(up: &Upstream, transport: &TransportConnector) -> bool {
        let (stream, reused) = up.stream(transport).await.unwrap();
        exchange_on(up, up.session(stream)).await;
        reused
    }

    /// One GET on `http`, read whole, then the connection handed back to `up`.
    async fn exchange_on(up: &Upstream, mut http: HttpSession) {
        let mut req = pingora::http::RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("Host", "x").unwrap();
        http.write_request_header(Box::new(req)).await.unwrap();
        http.finish_request_body().await.unwrap();
        http.read_response_header().await.unwrap();
        while !http.response_done() {
            http.read_response_body().await.unwrap();
        }
        up.release(http).await;
    }

    #[tokio::test]
    async fn connections_are_reused_until_they_age_out() {
        let (addr, mut accepted) = server().await;
        let transport = TransportConnector::new(None);
        let up = upstream(addr, 4, Duration::from_millis(300));
        assert!(!get(&up, &transport).await, "the first call connects");
        for _ in 0..5 {
            assert!(get(&up, &transport).await, "later calls reuse it");
        }
        assert_eq!(up.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(
            !get(&up, &transport).await,
            "an aged-out connection is not reused"
        );
        let mut connections = 0;
        while accepted.try_recv().is_ok() {
            connections += 1;
        }
        assert_eq!(connections, 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_reused() {
        // An upstream that answers one request per connection and closes it a moment later,
        // without saying so in its head: the connection is kept, then found closed.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    drop(conn);
                });
            }
        });
        let transport = TransportConnector::new(None);
        let up = upstream(addr, 4, Duration::from_secs(60));
        assert!(!get(&up, &transport).await);
        assert_eq!(up.idle_count(), 1, "kept while the upstream keeps it open");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !get(&up, &transport).await,
            "the closed connection is found and dropped when taken"
        );
        // The second connection is closed too; with no call to take it, the sweep drops it.
        assert_eq!(up.idle_count(), 1);
        tokio::time::sleep(SWEEP_EVERY + Duration::from_millis(300)).await;
        assert_eq!(up.idle_count(), 0, "the sweep closes it without a call");
    }

    #[tokio::test]
    async fn at_most_max_idle_are_kept() {
        let (addr, _accepted) = server().await;
        let transport = TransportConnector::new(None);
        let up = upstream(addr, 2, Duration::from_secs(60));
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(up.session(up.stream(&transport).await.unwrap().0));
        }
        for http in open {
            exchange_on(&up, http).await;
        }
        assert_eq!(up.idle_count(), 2);
        let none = upstream(addr, 0, Duration::from_secs(60));
        get(&none, &transport).await;
        assert_eq!(none.idle_count(), 0, "keepalive = 0 keeps nothing");
    }
}
