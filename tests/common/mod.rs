//! The black-box harness: starts the real `tollgate` binary on free loopback ports with a
//! fresh store on disk and its demo upstream in-process, and gives tests a blocking HTTP
//! client. Everything it starts stops when the handle drops.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Users every test config has (password = username + "-password-1").
pub const USERS: &str = r#"
[[users]]
username = "alice"
password = "alice-password-1"
company_key = "acme"
roles = ["USER"]
timezone = 3

[[users]]
username = "bob"
password = "bob-password-1"
company_key = "acme"
roles = ["USER"]

[[users]]
username = "paula"
password = "paula-password-1"
company_key = "acme"
roles = ["PARTNER"]

[[users]]
username = "mallory"
password = "mallory-password-1"
company_key = "evil_corp"
roles = ["USER"]

[[users]]
username = "root_admin"
password = "root_admin-password-1"
company_key = "acme"
roles = ["ADMIN"]
"#;

/// Routes to the demo upstream every test config has.
pub const ROUTES: &str = r#"
[[routes]]
method = "POST"
path = "/universal/plan/calculation"
upstream = "demo"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "run_plan_calculation"
points = ["/locations"]
unique_key = "/key"

[[routes]]
method = "POST"
path = "/universal/plan/calculation_async"
upstream = "demo"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "run_plan_calculation_async"
points = ["/locations"]
unique_key = "/key"

[[routes]]
method = "*"
path = "/universal/plan/calculation_async/{id}"
upstream = "demo"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "read_plan_calculation_state"
process_id = "id"

[[routes]]
method = "GET"
path = "/universal/plan/result/{id}"
upstream = "demo"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "read_plan_result"
process_id = "id"

[[routes]]
method = "POST"
path = "/routing/matrix/calculation"
upstream = "demo"
service = "ROUTING"
method_group = "MATRIX"
operation = "run_matrix_calculation"
points = ["/waypoints"]

[[routes]]
method = "POST"
path = "/demo/echo"
upstream = "demo"
service = "UNIVERSAL"
method_group = "CONVERT"
operation = "echo_payload"

[[routes]]
method = "GET"
path = "/universal/system/version"
upstream = "demo"
service = "UNIVERSAL"
method_group = "NOTRACE"
operation = "get_version"
auth = false
"#;

/// A loopback port free now, and never handed out before in this test process: the kernel may
/// give a port just released again, and a Tollgate given the same port for its proxy and its
/// metrics would answer calls with either.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

pub struct Tollgate {
    child: Option<Child>,
    pub port: u16,
    pub metrics_port: u16,
    pub demo_port: u16,
    pub base: String,
    pub demo: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// What a test puts in the config beyond the base: `@DEMO@` stands for the demo upstream's
/// address, so extra upstreams and routes can be written before the ports are known.
#[derive(Clone)]
pub struct Setup {
    pub extra: String,
    /// More keys of the `[server]` table.
    pub server: String,
    pub with_default_routes: bool,
    pub with_users: bool,
    pub compute_time_ms: u64,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            extra: String::new(),
            server: String::new(),
            with_default_routes: true,
            with_users: true,
            compute_time_ms: 300,
        }
    }
}

impl Tollgate {
    pub fn start() -> Tollgate {
        Self::start_with(Setup::default())
    }

    pub fn start_extra(extra: &str) -> Tollgate {
        Self::start_with(Setup {
            extra: extra.to_string(),
            ..Setup::default()
        })
    }

    pub fn start_with(setup: Setup) -> Tollgate {
        // Ports are picked free, then bound by the child: another test process may take one
        // in between. Tollgate then exits at start saying so, and gets other ports.
        for _ in 0..4 {
            let mut t = Self::configured(setup.clone());
            match t.try_spawn() {
                Ok(()) => return t,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("tollgate exited at start:\n{log}"),
            }
        }
        panic!("tollgate found no free ports in four tries");
    }

    /// A Tollgate configured on free ports, not started.
    fn configured(setup: Setup) -> Tollgate {
        let dir = tempfile::tempdir().unwrap();
        let (port, metrics_port, demo_port) = (free_port(), free_port(), free_port());
        let demo_addr = format!("127.0.0.1:{demo_port}");
        let mut config = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
name = "tollgate-test"
threads = 2
grace_period_seconds = 0
shutdown_timeout_seconds = 5
{server_extra}

[store]
path = "store"
flush_interval_ms = 20

[auth]
login_failures_per_account_per_minute = 1000
login_failures_per_address_per_minute = 1000

[metrics]
listen = "127.0.0.1:{metrics_port}"

[demo_upstream]
listen = "{demo_addr}"
compute_time_ms = {compute}

[docs]
dir = "{docs}"

[[upstreams]]
name = "demo"
address = "{demo_addr}"
connect_timeout_ms = 500
total_timeout_ms = 5000
"#,
            compute = setup.compute_time_ms,
            server_extra = setup.server,
            docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").display(),
        );
        if setup.with_default_routes {
            config.push_str(ROUTES);
        }
        if setup.with_users {
            config.push_str(USERS);
        }
        config.push_str(&setup.extra.replace("@DEMO@", &demo_addr));
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("tollgate.log");
        Tollgate {
            child: None,
            port,
            metrics_port,
            demo_port,
            base: format!("http://127.0.0.1:{port}"),
            demo: format!("http://{demo_addr}"),
            dir,
            config_path,
            log_path,
        }
    }

    /// Starts (or restarts) the binary on the same config and store.
    pub fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("tollgate exited at start:\n{log}");
        }
    }

    /// [`Tollgate::spawn`]; the log when the binary exited at start.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("TOLLGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tollgate");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("({status}) {}", self.log()));
            }
            let ok = client()
                .get(format!("{}/account/system/version", self.base))
                .send()
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            let demo_ok = TcpStream::connect(("127.0.0.1", self.demo_port)).is_ok();
            if ok && demo_ok {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, no goodbye: what a crash looks like to the store.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal` and waits for the exit; returns the exit code.
    pub fn stop_with(&mut self, signal: i32) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "tollgate did not stop within 20 s of signal {signal}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn token(&self, username: &str) -> String {
        self.token_for(username, &format!("{username}-password-1"))
    }

    pub fn token_for(&self, username: &str, password: &str) -> String {
        let r = client()
            .post(self.url("/account/token/generation"))
            .json(&json!({"username": username, "password": password, "ttl_seconds": 3600}))
            .send()
            .unwrap();
        let status = r.status();
        assert_eq!(
            status,
            200,
            "login of {username} failed: {}",
            r.text().unwrap_or_default()
        );
        r.json::<String>().unwrap()
    }

    pub fn get(&self, path: &str, token: &str) -> reqwest::blocking::Response {
        client()
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .unwrap()
    }

    pub fn post_json(&self, path: &str, token: &str, body: &Value) -> reqwest::blocking::Response {
        client()
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .unwrap()
    }

    pub fn demo_stats(&self) -> Value {
        client()
            .get(format!("{}/demo/stats", self.demo))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn demo_reset(&self) {
        client()
            .post(format!("{}/demo/stats/reset", self.demo))
            .send()
            .unwrap();
    }

    pub fn metrics(&self) -> String {
        client()
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// Runs a `tollgate user ...` command on this store (the server must be stopped).
    pub fn user_cli(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut child = Command::new(BIN)
            .arg("user")
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A JSON error body in the API's shape with complete tracedata.
pub fn assert_error_shape(body: &Value, service: &str) {
    let t = if body.get("resource_id").is_some() {
        &body["detail"]["tracedata"]
    } else {
        &body["tracedata"]
    };
    for field in ["code", "client", "server", "service", "operation", "time"] {
        assert!(t[field].is_string(), "tracedata.{field} missing in {body}");
    }
    assert!(
        uuid::Uuid::parse_str(t["code"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    assert!(t["client"].as_str().unwrap().len() >= 2, "{body}");
    assert!(t["operation"].as_str().unwrap().len() >= 3, "{body}");
    assert_eq!(t["service"], service, "{body}");
    assert!(
        chrono::DateTime::parse_from_rfc3339(t["time"].as_str().unwrap()).is_ok(),
        "{body}"
    );
    if body.get("resource_id").is_none() {
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
}

/// Per `(name, port)`: an upstream at that port (300 ms to connect, 500 ms in all) and the
/// counted route `POST /universal/plan/{name}` to it (operation `run_plan_{name}`).
pub fn failing_plan_routes(upstreams: &[(&str, u16)]) -> String {
    upstreams
        .iter()
        .map(|(name, port)| {
            format!(
                r#"
[[upstreams]]
name = "{name}"
address = "127.0.0.1:{port}"
connect_timeout_ms = 300
total_timeout_ms = 500

[[routes]]
method = "POST"
path = "/universal/plan/{name}"
upstream = "{name}"
service = "UNIVERSAL"
method_group = "PLAN"
operation = "run_plan_{name}"
points = ["/locations"]
"#
            )
        })
        .collect()
}

/// How a fault upstream behaves with each connection it accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Accepts and never answers.
    Hang,
    /// Reads the request, starts an answer, then resets the connection.
    ResetMidResponse,
    /// Reads the request and closes without a word.
    CloseSilently,
    /// Starts a chunked answer, sends one chunk, then resets the connection.
    ResetMidChunked,
    /// Starts a chunked answer, sends one chunk, then a chunk whose size is not hex.
    BadChunk,
    /// Answers 204 with a Content-Length (which a 204 never has a body for) and stays open.
    NoContentWithLength,
    /// Answers 200 with a Content-Length and no body, as to a HEAD request, and stays open.
    HeadOnly,
    /// Answers in HTTP/1.0 with neither a length nor chunks: the body ends when it closes.
    CloseDelimited,
    /// Answers 200 in two chunks and stays open.
    Chunked,
    /// Answers 200 in a coding Tollgate cannot take off (`gzip, chunked`) and stays open.
    GzipCoded,
    /// Answers 200 with `Transfer-Encoding: gzip` beside a length, and stays open.
    CodedWithLength,
    /// Answers 200 chunked with an empty chunk-size line before the body's real end.
    EmptyChunkSize,
    /// Answers 200 with `Transfer-Encoding: chunked,` (an empty element last) and a second
    /// answer hidden behind the chunked body, and stays open.
    ChunkedTrailingComma,
    /// Answers 101 (asked for no upgrade), then a 200 with a length, and stays open.
    SwitchingUnasked,
}

impl Fault {
    /// What a fault that keeps its connection open writes to it (nothing, for a hang); None
    /// for one that closes or resets it.
    fn held_answer(self) -> Option<&'static [&'static [u8]]> {
        Some(match self {
            Fault::Hang => &[],
            Fault::NoContentWithLength => &[b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"],
            Fault::HeadOnly => &[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n"],
            Fault::Chunked => &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"],
            Fault::GzipCoded => &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
            Fault::CodedWithLength => &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"],
            Fault::EmptyChunkSize => &[CHUNKED_HEAD, b"\r\nX: y\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
            Fault::BadChunk => &[CHUNKED_HEAD, b"zz\r\nabc\r\n0\r\n\r\n"],
            Fault::ChunkedTrailingComma => &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\nContent-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"smuggled\":\"TE\"}"],
            Fault::SwitchingUnasked => &[b"HTTP/1.1 101 Switching Protocols\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"],
            Fault::ResetMidResponse
            | Fault::CloseSilently
            | Fault::ResetMidChunked
            | Fault::CloseDelimited => return None,
        })
    }
}

const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nb\r\n{\"partial\":\r\n";

/// A raw TCP upstream that misbehaves on purpose; stops when dropped.
pub struct FaultUpstream {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl FaultUpstream {
    pub fn start(fault: Fault) -> FaultUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(500)))
                            .unwrap();
                        let mut buf = [0u8; 65536];
                        let _ = s.read(&mut buf);
                        if let Some(answer) = fault.held_answer() {
                            // Answered, and the connection kept open.
                            for part in answer {
                                let _ = s.write_all(part);
                            }
                            held.push(s);
                            continue;
                        }
                        match fault {
                            Fault::ResetMidResponse => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: application/json\r\n\r\n{\"partial\":");
                                let _ = socket_linger_zero(&s);
                                drop(s);
                            }
                            Fault::CloseSilently => drop(s),
                            Fault::ResetMidChunked => {
                                let _ = s.write_all(CHUNKED_HEAD);
                                let _ = socket_linger_zero(&s);
                                drop(s);
                            }
                            Fault::CloseDelimited => {
                                let _ = s.write_all(
                                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
                                );
                                drop(s);
                            }
                            _ => unreachable!("every other fault keeps its connection"),
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultUpstream { port, stop }
    }
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// SO_LINGER 0: closing sends RST instead of FIN.
fn socket_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads what `stream` still gives until Tollgate closes it, and returns how many bytes that
/// was; panics if it is still open after `within` without a byte.
pub fn read_until_closed(stream: &mut TcpStream, within: Duration) -> usize {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return received,
            Ok(n) => received += n,
            Err(e) => panic!("the connection stayed open: {e}"),
        }
    }
}

/// Sends raw bytes on a fresh connection and returns everything read until close or timeout.
pub fn raw_exchange(port: u16, request: &[u8], read_timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(read_timeout)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// Starts Tollgate with its generated config text rewritten by `edit` (for example to change a
/// value of the base config): starts once, stops, rewrites the file, starts again on the same
/// (now seeded) store.
pub fn start_with_config_edit(setup: Setup, edit: impl FnOnce(&str) -> String) -> Tollgate {
    let mut t = Tollgate::start_with(setup);
    t.terminate();
    let text = std::fs::read_to_string(&t.config_path).unwrap();
    let edited = edit(&text);
    assert_ne!(edited, text, "the edit changed nothing");
    std::fs::write(&t.config_path, edited).unwrap();
    t.spawn();
    t
}

/// Polls `f` every 10 ms until it returns true or `timeout` passes; returns whether it held.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
