//! Tollgate's configuration: read from TOML (`toml`), checked rule by rule, and handed to the
//! rest as the validated model (`internal`). Only this module knows TOML. Every problem names
//! its key path, and all of them are reported at once, at start-up.

mod internal;
mod toml;

pub use internal::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::model::{is_word, MethodGroup, Role, ServiceName};
use crate::quota::points::PointsRule;

/// One thing wrong with a config file, at a key path such as `routes[2].method_group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Whether two configured paths name one folder: as written, made absolute and with `.` and
/// `..` resolved, or, when both exist, after links are followed.
fn same_folder(a: &Path, b: &Path) -> bool {
    fn plain(p: &Path) -> PathBuf {
        let absolute = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut out = PathBuf::new();
        for c in absolute.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    }
    if plain(a) == plain(b) {
        return true;
    }
    matches!(
        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
        (Ok(a), Ok(b)) if a == b
    )
}

/// Whether two listen addresses would take the same port (a port 0 is picked when bound).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    let (ip_a, ip_b) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() != 0
        && a.port() == b.port()
        && (ip_a == ip_b || ip_a.is_unspecified() || ip_b.is_unspecified())
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem {
            key: path.display().to_string(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &base)
}

/// Resolves the upstreams given by host name, once, to their first address: what `serve`
/// and `check-config` do (the `user` commands, which never reach an upstream, do not).
pub fn resolve_upstreams(config: &mut Config) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    for (i, u) in config.upstreams.iter_mut().enumerate() {
        if u.authority.parse::<SocketAddr>().is_ok() {
            continue;
        }
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(u.authority.as_str())
            .map_err(|e| e.to_string())
            .and_then(|mut addrs| addrs.next().ok_or_else(|| "no address".to_string()));
        match resolved {
            Ok(addr) => u.address = addr,
            Err(e) => problems.push(Problem {
                key: format!("upstreams[{i}].address"),
                message: format!("'{}' does not resolve: {e}", u.authority),
            }),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Parses config text; relative paths in it are taken from `base` (the file's folder).
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut tainted = Vec::new();
    let file = match read_file(::toml::Deserializer::new(text), text) {
        Ok(file) => file,
        Err(first) => match read_on(text, first, &mut problems, &mut tainted) {
            Some(file) => file,
            None => return Err(problems),
        },
    };
    let from_shape = problems.len();
    let mut v = Validator {
        problems,
        base: base.to_path_buf(),
    };
    let config = v.config(file);
    // A key already reported as malformed or missing has a placeholder or a default standing
    // in for it: what the checks say of that is no news.
    let stood_in = |key: &str| {
        tainted.iter().any(|t| {
            key.strip_prefix(t.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    };
    let mut problems = v.problems;
    let checks = problems.split_off(from_shape);
    problems.extend(checks.into_iter().filter(|p| !stood_in(&p.key)));
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// What kind of problem the file's shape has.
enum Shape {
    /// A key the model does not have: dropped, and the file read on.
    Unknown,
    /// A required key that is missing: a placeholder stands in for it.
    Missing(String),
    /// A value of the wrong type at a key: dropped (a placeholder stands in if it is required).
    Invalid,
    /// Unreadable TOML, or a problem with no key to drop.
    Fatal,
}

/// After a problem in the file's shape, reads on from the parsed tree with the offending key
/// dropped (or, if required, stood in for), so that one problem never hides the others.
/// `tainted`: the keys reported here, whose later checks would only repeat the problem.
fn read_on(
    text: &str,
    first: (Problem, Shape),
    problems: &mut Vec<Problem>,
    tainted: &mut Vec<String>,
) -> Option<toml::File> {
    let mut next = first;
    // Later problems are found in the parsed tree, which has no line numbers.
    let mut value: Option<::toml::Value> = None;
    for _ in 0..1000 {
        let (problem, shape) = next;
        let key = problem.key.clone();
        match shape {
            Shape::Fatal => {
                problems.push(problem);
                return None;
            }
            Shape::Missing(field) => {
                let key = format!("{key}.{field}");
                // A required key dropped for its type is missing now: already reported.
                if !tainted.contains(&key) {
                    problems.push(Problem {
                        key: key.clone(),
                        message: "missing: this key is required".into(),
                    });
                    tainted.push(key.clone());
                }
                let tree = match &mut value {
                    Some(tree) => tree,
                    None => value.insert(::toml::from_str(text).ok()?),
                };
                set_key(tree, &key, ::toml::Value::String(String::new()))?;
            }
            Shape::Unknown | Shape::Invalid => {
                problems.push(problem);
                let tree = match &mut value {
                    Some(tree) => tree,
                    None => value.insert(::toml::from_str(text).ok()?),
                };
                // An element of an array (`routes[0].roles[1]`) goes with its whole array.
                let key = match key.strip_suffix(']').and_then(|k| k.rsplit_once('[')) {
                    Some((array, index)) if index.bytes().all(|b| b.is_ascii_digit()) => {
                        array.to_string()
                    }
                    _ => key,
                };
                take_key(tree, &key)?;
                if matches!(shape, Shape::Invalid) {
                    tainted.push(key);
                }
            }
        }
        match read_file(value.clone()?, "") {
            Ok(file) => return Some(file),
            Err(problem) => next = problem,
        }
    }
    None
}

/// Deserializes the file model; on failure, the problem and its kind.
fn read_file<'de, D>(deserializer: D, text: &str) -> Result<toml::File, (Problem, Shape)>
where
    D: serde::Deserializer<'de, Error = ::toml::de::Error>,
{
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let message = in_toml_words(inner.message());
        let shape = if key == "." || key.is_empty() {
            Shape::Fatal
        } else if message.starts_with("unknown field") {
            Shape::Unknown
        } else if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            Shape::Missing(field.to_string())
        } else {
            Shape::Invalid
        };
        let at = inner
            .span()
            .filter(|_| !text.is_empty())
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        (
            Problem {
                key: if key == "." { "(file)".into() } else { key },
                message: message + &at,
            },
            shape,
        )
    })
}

/// serde's words for the model's types, in TOML's: "expected i64" reads "expected an integer".
fn in_toml_words(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: table"),
    ] {
        m = m.replace(rust, toml);
    }
    m
}

/// The table holding the key at a path such as `routes[2].pointz`, and the key's name.
fn parent_of<'v>(
    value: &'v mut ::toml::Value,
    path: &'v str,
) -> Option<(&'v mut ::toml::Table, &'v str)> {
    let mut steps: Vec<Result<&str, usize>> = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            steps.push(Ok(name));
        }
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            steps.push(Err(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    let (Ok(last), parents) = steps.split_last()? else {
        return None;
    };
    let mut at = value;
    for step in parents {
        at = match (step, at) {
            (Ok(name), ::toml::Value::Table(t)) => t.get_mut(*name)?,
            (Err(index), ::toml::Value::Array(a)) => a.get_mut(*index)?,
            _ => return None,
        };
    }
    match at {
        ::toml::Value::Table(t) => Some((t, last)),
        _ => None,
    }
}

/// Removes the key at a path; `None` when there is none.
fn take_key(value: &mut ::toml::Value, path: &str) -> Option<::toml::Value> {
    let (table, name) = parent_of(value, path)?;
    table.remove(name)
}

/// Sets the key at a path (its table must exist).
fn set_key(value: &mut ::toml::Value, path: &str, to: ::toml::Value) -> Option<()> {
    let (table, name) = parent_of(value, path)?;
    table.insert(name.to_string(), to);
    Some(())
}

struct Validator {
    problems: Vec<Problem>,
    base: PathBuf,
}

impl Validator {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn addr(&mut self, key: &str, value: &str) -> SocketAddr {
        match value.parse::<SocketAddr>() {
            // Port 0 would be one the system picks, which no caller could be told.
            Ok(addr) if addr.port() == 0 => {
                self.problem(key, format!("'{value}': port 0 is no port to listen on"));
                addr
            }
            Ok(addr) => addr,
            Err(_) => {
                self.problem(
                    key,
                    format!("'{value}' is not an address such as 127.0.0.1:8080"),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// An upstream's `host:port`: an address, or a host name, resolved when the server starts
    /// (see [`resolve_upstreams`]); until then its address is `0.0.0.0:0`, which nothing
    /// reaches.
    fn upstream_addr(&mut self, key: &str, value: &str) -> (SocketAddr, String) {
        let unresolved = SocketAddr::from(([0, 0, 0, 0], 0));
        if let Ok(addr) = value.parse::<SocketAddr>() {
            if addr.port() == 0 {
                self.problem(key, format!("'{value}': port 0 cannot be connected to"));
            }
            return (addr, value.to_string());
        }
        match value.rsplit_once(':') {
            // A bare IPv6 address ("::1:9") is no host name: it is written in brackets.
            Some((host, port)) if !host.is_empty() && !host.contains(['/', '[', ']', '@', ':']) => {
                if !port.parse::<u16>().is_ok_and(|p| p != 0) {
                    self.problem(
                        key,
                        format!("'{value}': the port must be a number 1..65535"),
                    );
                }
            }
            _ => self.problem(
                key,
                format!(
                    "'{value}' is not host:port, such as 127.0.0.1:8080, [::1]:8080 or \
                     compute.internal:8080"
                ),
            ),
        }
        (unresolved, value.to_string())
    }

    fn range(&mut self, key: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        let v = value.unwrap_or(default);
        if v < min || v > max {
            self.problem(key, format!("{v} is out of range {min}..={max}"));
            return default;
        }
        v
    }

    fn opt_range(&mut self, key: &str, value: Option<i64>, min: i64, max: i64) -> Option<i64> {
        value.map(|v| self.range(key, Some(v), min, min, max))
    }

    /// A path from the config, relative to the config's folder; an empty one is a problem (it
    /// would mean the config's folder itself, never what was meant).
    fn nonempty_path(&mut self, key: &str, value: &str) -> PathBuf {
        if value.trim().is_empty() {
            self.problem(key, "must not be empty: name a path");
        }
        self.path(value)
    }

    fn path(&self, value: &str) -> PathBuf {
        let p = PathBuf::from(value);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn parsed<T: std::str::FromStr<Err = String>>(&mut self, key: &str, value: &str) -> Option<T> {
        value
            .parse()
            .map_err(|e| self.problem(key, format!("'{value}' {e}")))
            .ok()
    }

    fn config(&mut self, f: toml::File) -> Config {
        let server = Server {
            listen: self.addr(
                "server.listen",
                f.server.listen.as_deref().unwrap_or("127.0.0.1:8080"),
            ),
            name: {
                let name = f.server.name.unwrap_or_else(|| "tollgate".into());
                if !(2..=256).contains(&name.chars().count()) {
                    self.problem(
                        "server.name",
                        "must be 2..256 characters (it is tracedata.server)",
                    );
                }
                Arc::from(name)
            },
            threads: self.range("server.threads", f.server.threads, 2, 1, 256) as usize,
            log_format: match f.server.log_format.as_deref().unwrap_or("text") {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    self.problem(
                        "server.log_format",
                        format!("'{other}' must be \"text\" or \"json\""),
                    );
                    LogFormat::Text
                }
            },
            grace_period_seconds: self.range(
                "server.grace_period_seconds",
                f.server.grace_period_seconds,
                1,
                0,
                3600,
            ) as u64,
            shutdown_timeout_seconds: self.range(
                "server.shutdown_timeout_seconds",
                f.server.shutdown_timeout_seconds,
                30,
                1,
                3600,
            ) as u64,
            keepalive_timeout_seconds: self.range(
                "server.keepalive_timeout_seconds",
                f.server.keepalive_timeout_seconds,
                60,
                1,
                3600,
            ) as u64,
        };
        let limits = Limits {
            max_body_bytes: self.range(
                "limits.max_body_bytes",
                f.limits.max_body_bytes,
                32 << 20,
                1,
                1 << 32,
            ) as usize,
            max_capture_bytes: self.range(
                "limits.max_capture_bytes",
                f.limits.max_capture_bytes,
                1 << 20,
                0,
                1 << 32,
            ) as usize,
            client_read_timeout: Duration::from_millis(self.range(
                "limits.client_read_timeout_ms",
                f.limits.client_read_timeout_ms,
                60_000,
                1,
                3_600_000,
            ) as u64),
        };
        let upstreams: Vec<Upstream> = f
            .upstreams
            .into_iter()
            .enumerate()
            .map(|(i, u)| self.upstream(i, u))
            .collect();
        for (i, u) in upstreams.iter().enumerate() {
            if upstreams[..i].iter().any(|o| o.name == u.name) {
                // Routes name upstreams: the later one could never be reached.
                self.problem(
                    format!("upstreams[{i}].name"),
                    format!("'{}' is listed twice", u.name),
                );
            }
        }
        let store = Store {
            path: self.nonempty_path("store.path", f.store.path.as_deref().unwrap_or("data")),
            flush_interval: Duration::from_millis(self.range(
                "store.flush_interval_ms",
                f.store.flush_interval_ms,
                100,
                1,
                60_000,
            ) as u64),
            durability: match f.store.durability.as_deref().unwrap_or("buffered") {
                "buffered" => Durability::Buffered,
                "strict" => Durability::Strict,
                other => {
                    self.problem(
                        "store.durability",
                        format!("'{other}' must be \"buffered\" or \"strict\""),
                    );
                    Durability::Buffered
                }
            },
            payload_retention_days: self.range(
                "store.payload_retention_days",
                f.store.payload_retention_days,
                30,
                1,
                3653,
            ) as u32,
            audit_retention_days: self.range(
                "store.audit_retention_days",
                f.store.audit_retention_days,
                90,
                1,
                3653,
            ) as u32,
            queue_capacity: self.range(
                "store.queue_capacity",
                f.store.queue_capacity,
                65_536,
                16,
                16 << 20,
            ) as usize,
            lease_ttl: {
                // A route may wait longer than its upstream's default: its lease must outlive it.
                let longest = upstreams
                    .iter()
                    .map(|u| u.total_timeout.as_secs())
                    .chain(
                        f.routes
                            .iter()
                            .filter_map(|r| r.total_timeout_ms)
                            .map(|ms| ms.clamp(0, 3_600_000) as u64 / 1000),
                    )
                    .max()
                    .unwrap_or(0);
                let default = (longest + 60) as i64;
                // Shorter than the longest call, a slot could be handed on while its call runs.
                Duration::from_secs(self.range(
                    "store.lease_ttl_seconds",
                    f.store.lease_ttl_seconds,
                    default,
                    longest as i64 + 1,
                    86_400,
                ) as u64)
            },
        };
        let auth = Auth {
            secret: f.auth.secret.filter(|s| {
                let ok = s.len() >= 32;
                if !ok {
                    self.problem("auth.secret", "must be at least 32 characters (256 bits); leave it out to have one generated");
                }
                ok
            }),
            secret_file: f
                .auth
                .secret_file
                .map(|p| self.nonempty_path("auth.secret_file", &p))
                .unwrap_or_else(|| store.path.join("jwt-secret")),
            previous_secrets: {
                let previous = f.auth.previous_secrets.unwrap_or_default();
                for (j, s) in previous.iter().enumerate() {
                    // Tokens signed with it are still accepted: a weak one is as weak as a
                    // weak current secret.
                    if s.len() < 32 {
                        self.problem(
                            format!("auth.previous_secrets[{j}]"),
                            "must be at least 32 characters (256 bits), as the secret",
                        );
                    }
                }
                previous
            },
            login_failures_per_account_per_minute: self.range("auth.login_failures_per_account_per_minute", f.auth.login_failures_per_account_per_minute, 5, 1, 100_000) as u32,
            login_failures_per_address_per_minute: self.range("auth.login_failures_per_address_per_minute", f.auth.login_failures_per_address_per_minute, 30, 1, 100_000) as u32,
        };
        let metrics_listen = f.metrics.map(|m| self.addr("metrics.listen", &m.listen));
        let demo_upstream = f.demo_upstream.map(|d| DemoUpstream {
            listen: self.addr("demo_upstream.listen", &d.listen),
            compute_time: Duration::from_millis(self.range(
                "demo_upstream.compute_time_ms",
                d.compute_time_ms,
                2000,
                0,
                3_600_000,
            ) as u64),
        });
        // Two listeners on one port both accept its connections, each a share of them.
        let listeners = [
            ("server.listen", Some(server.listen)),
            ("metrics.listen", metrics_listen),
            (
                "demo_upstream.listen",
                demo_upstream.as_ref().map(|d| d.listen),
            ),
        ];
        for (i, (key, addr)) in listeners.iter().enumerate() {
            let Some(addr) = addr else { continue };
            let clash = listeners[..i]
                .iter()
                .find(|(_, other)| other.is_some_and(|other| same_port(other, *addr)));
            if let Some((other, _)) = clash {
                self.problem(
                    *key,
                    format!("{addr} is also {other}'s port: each listener needs its own"),
                );
            }
        }
        let docs_raw = f.docs.dir.as_deref().unwrap_or("docs");
        let docs_dir = self.nonempty_path("docs.dir", docs_raw);
        // The docs folder's pages are public: the store's folder (its secret, its records)
        // must not be it. (An empty path is reported as such.)
        let blank = |p: Option<&str>| p.is_some_and(|p| p.trim().is_empty());
        if !blank(f.store.path.as_deref())
            && !blank(Some(docs_raw))
            && same_folder(&docs_dir, &store.path)
        {
            // Named by the key that was set: a default is not the mistake.
            let key = if f.docs.dir.is_some() {
                "docs.dir"
            } else {
                "store.path"
            };
            self.problem(
                key,
                format!(
                    "docs.dir and store.path are one folder, '{}': the docs folder's pages are \
                     served to anyone, the store must stay private",
                    store.path.display()
                ),
            );
        }
        let mut routes: Vec<Route> = Vec::with_capacity(f.routes.len());
        let mut indices = Vec::with_capacity(f.routes.len());
        for (i, r) in f.routes.into_iter().enumerate() {
            let Some(route) = self.route(i, r, &upstreams) else {
                continue;
            };
            // The first route that matches a call wins: one that an earlier route matches in
            // whole would never be reached.
            let shadow = routes.iter().zip(&indices).find(|(earlier, _)| {
                let method = match (&earlier.method, &route.method) {
                    (MethodMatch::Any, _) => true,
                    // A HEAD is served by the first GET route that matches it.
                    (MethodMatch::One(a), MethodMatch::One(b)) => {
                        a == b || (*a == http::Method::GET && *b == http::Method::HEAD)
                    }
                    (MethodMatch::One(_), MethodMatch::Any) => false,
                };
                method && route.pattern.within(&earlier.pattern)
            });
            if let Some((_, j)) = shadow {
                self.problem(
                    format!("routes[{i}]"),
                    format!(
                        "never reached: routes[{j}] comes first and matches every call this \
                         one would (the first route that matches wins)"
                    ),
                );
            }
            routes.push(route);
            indices.push(i);
        }
        let mut quotas: Vec<Quota> = Vec::new();
        for (i, q) in f.quotas.into_iter().enumerate() {
            if let Some(q) = self.quota(i, q) {
                let same = |o: &Quota| {
                    (o.service, o.method_group, &o.scope) == (q.service, q.method_group, &q.scope)
                };
                if quotas.iter().any(same) {
                    // One would silently win over the other.
                    self.problem(
                        format!("quotas[{i}]"),
                        "another [[quotas]] entry sets this service, method_group and scope",
                    );
                }
                quotas.push(q);
            }
        }
        let mut users: Vec<UserSeed> = Vec::new();
        for (i, u) in f.users.into_iter().enumerate() {
            if let Some(seed) = self.user(i, u) {
                if users.iter().any(|o| o.username == seed.username) {
                    self.problem(
                        format!("users[{i}].username"),
                        format!("'{}' is listed twice", seed.username),
                    );
                }
                users.push(seed);
            }
        }
        Config {
            server,
            limits,
            store,
            auth,
            metrics_listen,
            demo_upstream,
            docs_dir,
            upstreams,
            routes,
            quotas,
            users,
        }
    }

    fn upstream(&mut self, i: usize, u: toml::Upstream) -> Upstream {
        let key = |k: &str| format!("upstreams[{i}].{k}");
        if u.name.trim().is_empty() {
            self.problem(
                key("name"),
                "must not be empty: routes name their upstream by it",
            );
        }
        let (address, authority) = self.upstream_addr(&key("address"), &u.address);
        Upstream {
            address,
            authority,
            connect_timeout: Duration::from_millis(self.range(
                &key("connect_timeout_ms"),
                u.connect_timeout_ms,
                1_000,
                1,
                600_000,
            ) as u64),
            total_timeout: Duration::from_millis(self.range(
                &key("total_timeout_ms"),
                u.total_timeout_ms,
                60_000,
                1,
                3_600_000,
            ) as u64),
            idle_timeout: Duration::from_secs(self.range(
                &key("idle_timeout_seconds"),
                u.idle_timeout_seconds,
                60,
                1,
                3600,
            ) as u64),
            keepalive: self.range(&key("keepalive"), u.keepalive, 128, 0, 65_536) as usize,
            name: u.name,
        }
    }

    fn route(&mut self, i: usize, r: toml::Route, upstreams: &[Upstream]) -> Option<Route> {
        let key = |k: &str| format!("routes[{i}].{k}");
        let method = match r.method.as_str() {
            "*" => Some(MethodMatch::Any),
            m => match http::Method::from_bytes(m.as_bytes()) {
                Ok(m) if m.as_str().bytes().all(|b| b.is_ascii_uppercase()) => {
                    Some(MethodMatch::One(m))
                }
                _ => {
                    self.problem(
                        key("method"),
                        format!("'{m}' must be an upper-case HTTP method or \"*\""),
                    );
                    None
                }
            },
        };
        let pattern = PathPattern::parse(&r.path)
            .map_err(|e| self.problem(key("path"), format!("'{}' {e}", r.path)))
            .ok();
        if pattern.is_some() && crate::proxy::has_dot_segment(&r.path) {
            // Plain, encoded, or ended by a ';' parameter: calls with one are refused.
            self.problem(
                key("path"),
                format!(
                    "'{}' has a dot segment: calls with one are refused, so it would never match",
                    r.path
                ),
            );
        }
        if r.path == "/account" || r.path.starts_with("/account/") {
            self.problem(
                key("path"),
                "/account/ is the account API's: a route there would never be reached",
            );
        }
        let upstream = upstreams.iter().position(|u| u.name == r.upstream);
        if upstream.is_none() {
            self.problem(
                key("upstream"),
                format!("'{}' names no [[upstreams]] entry", r.upstream),
            );
        }
        let service = self.parsed::<ServiceName>(&key("service"), &r.service);
        let method_group = self.parsed::<MethodGroup>(&key("method_group"), &r.method_group);
        if !(3..=256).contains(&r.operation.chars().count()) {
            self.problem(key("operation"), "must be 3..256 characters");
        }
        let points = PointsRule {
            array_pointers: r.points.unwrap_or_default(),
            unique_key_pointer: r.unique_key,
        };
        for (j, pointer) in points.array_pointers.iter().enumerate() {
            if let Err(rule) = crate::quota::points::check_pointer(pointer) {
                self.problem(
                    format!("routes[{i}].points[{j}]"),
                    format!("{pointer:?}: {rule}"),
                );
            }
        }
        if let Some(pointer) = &points.unique_key_pointer {
            if let Err(rule) = crate::quota::points::check_pointer(pointer) {
                self.problem(key("unique_key"), format!("{pointer:?}: {rule}"));
            }
        }
        if let (Some(name), Some(p)) = (&r.process_id, &pattern) {
            if !p.segments.contains(&Segment::Param(name.clone())) {
                self.problem(
                    key("process_id"),
                    format!("'{name}' is not a {{{name}}} segment of the path"),
                );
            }
        }
        let mut roles: Vec<Role> = Vec::new();
        for (j, name) in r.roles.iter().flatten().enumerate() {
            let Some(role) = self.parsed::<Role>(&format!("routes[{i}].roles[{j}]"), name) else {
                continue;
            };
            if roles.contains(&role) {
                self.problem(key("roles"), format!("lists '{name}' twice"));
            }
            roles.push(role);
        }
        for (j, pointer) in r.redact.iter().flatten().enumerate() {
            // A pointer that is no pointer would never match: the values it means to hide
            // would be stored in clear.
            if let Err(rule) = crate::quota::points::check_pointer(pointer) {
                self.problem(format!("routes[{i}].redact[{j}]"), rule);
            }
        }
        let total_timeout = self
            .opt_range(&key("total_timeout_ms"), r.total_timeout_ms, 1, 3_600_000)
            .map(|ms| Duration::from_millis(ms as u64));
        let requests_per_second = self
            .opt_range(
                &key("requests_per_second"),
                r.requests_per_second,
                1,
                1_000_000,
            )
            .map(|v| v as u32);
        Some(Route {
            // Without its method the route is reported, and left out of the checks that
            // compare routes (which would take it for one of every method).
            method: method?,
            pattern: pattern?,
            upstream: upstream?,
            service: service?,
            method_group: method_group?,
            operation: Arc::from(r.operation),
            points,
            process_id: r.process_id,
            auth: r.auth.unwrap_or(true),
            roles,
            total_timeout,
            requests_per_second,
            capture: r.capture.unwrap_or(true),
            redact: r.redact.unwrap_or_default(),
        })
    }

    fn quota(&mut self, i: usize, q: toml::Quota) -> Option<Quota> {
        let key = |k: &str| format!("quotas[{i}].{k}");
        let service = self.parsed::<ServiceName>(&key("service"), &q.service);
        let method_group = self.parsed::<MethodGroup>(&key("method_group"), &q.method_group);
        let scope = match (q.company, q.user) {
            (None, None) => QuotaScope::Default,
            (Some(c), None) => QuotaScope::Company(c),
            (None, Some(u)) => QuotaScope::User(u),
            (Some(_), Some(_)) => {
                self.problem(key("user"), "set either company or user, not both");
                QuotaScope::Default
            }
        };
        let bounded = |this: &mut Self, name: &str, value: Option<i64>, (min, max): (u64, u64)| {
            this.opt_range(&key(name), value, min as i64, max as i64)
        };
        let values = QuotaValues {
            points_per_request: bounded(
                self,
                "points_per_request",
                q.points_per_request,
                quota_bounds::POINTS_PER_REQUEST,
            )
            .map(|v| v as u64),
            points_per_day: bounded(
                self,
                "points_per_day",
                q.points_per_day,
                quota_bounds::POINTS_PER_DAY,
            )
            .map(|v| v as u64),
            points_per_date_window: bounded(
                self,
                "points_per_date_window",
                q.points_per_date_window,
                quota_bounds::POINTS_PER_DATE_WINDOW,
            )
            .map(|v| v as u64),
            date_window_days: bounded(
                self,
                "date_window_days",
                q.date_window_days,
                quota_bounds::DATE_WINDOW_DAYS,
            )
            .map(|v| v as u32),
            max_concurrent_execution: bounded(
                self,
                "max_concurrent_execution",
                q.max_concurrent_execution,
                quota_bounds::MAX_CONCURRENT_EXECUTION,
            )
            .map(|v| v as u32),
        };
        if values.points_per_date_window.is_some()
            && values.date_window_days.is_none()
            && scope == QuotaScope::Default
        {
            self.problem(
                key("date_window_days"),
                "is required with points_per_date_window (N >= 2)",
            );
        }
        Some(Quota {
            service: service?,
            method_group: method_group?,
            scope,
            values,
        })
    }

    fn user(&mut self, i: usize, u: toml::User) -> Option<UserSeed> {
        let key = |k: &str| format!("users[{i}].{k}");
        if !(2..=256).contains(&u.username.len()) || !is_word(&u.username) {
            self.problem(key("username"), "must be 2..256 word characters (\\w+)");
        }
        if !(3..=256).contains(&u.company_key.len()) || !is_word(&u.company_key) {
            self.problem(key("company_key"), "must be 3..256 word characters (\\w+)");
        }
        for (field, value) in [("username", &u.username), ("company_key", &u.company_key)] {
            if crate::model::is_reserved_name(value) {
                self.problem(key(field), crate::model::RESERVED_NAME_RULE);
            }
        }
        if let Err(rule) = crate::trace::check_client_label(&u.company_key, &u.username) {
            self.problem(key("company_key"), rule);
        }
        let password = match (u.password, u.password_hash) {
            (Some(p), None) if (1..=1000).contains(&p.chars().count()) => {
                Some(PasswordSeed::Plain(p))
            }
            (Some(_), None) => {
                self.problem(key("password"), "must be 1..1000 characters");
                None
            }
            (None, Some(h)) => match crate::auth::password::meets_minimum(&h) {
                Ok(()) => Some(PasswordSeed::Hash(h)),
                Err(rule) => {
                    self.problem(
                        key("password_hash"),
                        format!("must be an argon2id PHC string ($argon2id$...): {rule}"),
                    );
                    None
                }
            },
            _ => {
                self.problem(
                    key("password"),
                    "give exactly one of password and password_hash",
                );
                None
            }
        };
        let roles: Vec<Role> = u
            .roles
            .unwrap_or_else(|| vec!["USER".into()])
            .iter()
            .enumerate()
            .filter_map(|(j, r)| self.parsed::<Role>(&format!("users[{i}].roles[{j}]"), r))
            .collect();
        if roles.is_empty() || roles.len() > 2 {
            self.problem(key("roles"), "must list 1 or 2 roles");
        } else if roles.len() == 2 && roles[0] == roles[1] {
            self.problem(key("roles"), "must list 1 or 2 different roles");
        }
        for (field, value, min, max) in [
            ("name", &u.name, 2, 256),
            ("email", &u.email, 5, 256),
            ("phone", &u.phone, 5, 32),
        ] {
            if let Some(v) = value {
                if !(min..=max).contains(&v.chars().count()) {
                    self.problem(key(field), format!("must be {min}..{max} characters"));
                }
            }
        }
        let timezone = self.range(&key("timezone"), u.timezone, 0, -12, 12) as i32;
        Some(UserSeed {
            username: u.username,
            password: password?,
            company_key: u.company_key,
            roles,
            name: u.name,
            email: u.email,
            phone: u.phone,
            timezone,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        parse(text, Path::new("/etc/tollgate")).unwrap_err()
    }

    #[test]
    fn paths_and_ports_that_mean_nothing_or_too_much_are_refused() {
        let keys =
            |text: &str| -> Vec<String> { problems(text).into_iter().map(|p| p.key).collect() };
        // Empty paths would mean the config's own folder.
        assert_eq!(
            keys("[store]\npath = \"\"\n[auth]\nsecret_file = \" \"\n[docs]\ndir = \"\"\n"),
            ["store.path", "auth.secret_file", "docs.dir"]
        );
        // The docs folder is public: it may not be the store's folder, however spelt.
        for (store, docs) in [
            ("data", "data"),
            ("data", "./data/"),
            ("data", "../tollgate/data"),
            ("/etc/tollgate/data", "data"),
        ] {
            let p = problems(&format!(
                "[store]\npath = \"{store}\"\n[docs]\ndir = \"{docs}\"\n"
            ));
            assert_eq!(p.len(), 1, "{store} {docs}: {p:?}");
            assert_eq!(p[0].key, "docs.dir");
            assert!(p[0].message.contains("are one folder"), "{p:?}");
        }
        // Left at its default, docs is not what was set wrong.
        let p = problems("[store]\npath = \"docs\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "store.path");
        // Folders inside one another serve nothing of the store: only the docs folder's own
        // pages are served.
        for (store, docs) in [("data", "data-docs"), (".", "docs"), ("site/data", "site")] {
            parse(
                &format!("[store]\npath = \"{store}\"\n[docs]\ndir = \"{docs}\"\n"),
                Path::new("/etc/tollgate"),
            )
            .unwrap();
        }
        assert_eq!(
            keys(
                "[server]\nlisten = \"127.0.0.1:0\"\n\
                 [[upstreams]]\nname = \"\"\naddress = \"127.0.0.1:0\"\n\
                 [[upstreams]]\nname = \"h\"\naddress = \"compute.internal:0\"\n"
            ),
            [
                "server.listen",
                "upstreams[0].name",
                "upstreams[0].address",
                "upstreams[1].address"
            ]
        );
    }

    #[test]
    fn a_route_listing_a_role_twice_or_a_dot_segment_is_refused() {
        let route = |path: &str, roles: &str| {
            format!(
                "[[upstreams]]\nname = \"u\"\naddress = \"127.0.0.1:9\"\n\
                 [[routes]]\nmethod = \"GET\"\npath = \"{path}\"\nupstream = \"u\"\n\
                 service = \"UNIVERSAL\"\nmethod_group = \"PLAN\"\noperation = \"abc\"\n\
                 roles = {roles}\n"
            )
        };
        let p = problems(&route("/a/b", "[\"USER\", \"USER\"]"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].key.as_str(), p[0].message.as_str()),
            ("routes[0].roles", "lists 'USER' twice")
        );
        for path in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/%2e%2e/b",
            "/a/..;x/b",
            "/a/.%2E",
        ] {
            let p = problems(&route(path, "[\"USER\"]"));
            assert_eq!(p.len(), 1, "{path}: {p:?}");
            assert_eq!(p[0].key, "routes[0].path", "{path}");
            assert!(p[0].message.contains("dot segment"), "{p:?}");
        }
    }

    #[test]
    fn listeners_sharing_a_port_are_refused() {
        let p = problems(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[metrics]\nlisten = \"0.0.0.0:8080\"\n\
             [demo_upstream]\nlisten = \"127.0.0.1:8080\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["metrics.listen", "demo_upstream.listen"], "{p:?}");
        assert!(p[0].message.contains("server.listen"), "{p:?}");
        let mapped = problems(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[metrics]\nlisten = \"[::ffff:127.0.0.1]:8080\"\n",
        );
        assert_eq!(mapped.len(), 1, "{mapped:?}");
        let fine =
            "[server]\nlisten = \"127.0.0.1:8080\"\n[metrics]\nlisten = \"127.0.0.2:8080\"\n\
                    [demo_upstream]\nlisten = \"127.0.0.1:8081\"\n";
        parse(fine, Path::new("/etc/tollgate")).unwrap();
    }

    #[test]
    fn empty_file_gets_defaults() {
        let c = parse("", Path::new("/etc/tollgate")).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.limits.max_body_bytes, 32 << 20);
        assert_eq!(c.store.path, PathBuf::from("/etc/tollgate/data"));
        assert_eq!(
            c.auth.secret_file,
            PathBuf::from("/etc/tollgate/data/jwt-secret")
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let p = problems("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].key.contains("server"), "{p:?}");
        assert!(p[0].message.contains("lisen"), "{p:?}");
        let p = problems("[[routes]]\nmethod=\"GET\"\npath=\"/a\"\nupstream=\"u\"\nservice=\"UNIVERSAL\"\nmethod_group=\"PLAN\"\noperation=\"abc\"\npointz=[]\n");
        assert!(
            p[0].key.starts_with("routes[0]") && p[0].message.contains("pointz"),
            "{p:?}"
        );
    }

    #[test]
    fn leases_outlive_the_longest_route_timeout() {
        let c = parse(
            "[[upstreams]]\nname = \"u\"\naddress = \"127.0.0.1:9\"\ntotal_timeout_ms = 5000\n[[routes]]\nmethod = \"POST\"\npath = \"/a\"\nupstream = \"u\"\nservice = \"UNIVERSAL\"\nmethod_group = \"PLAN\"\noperation = \"abc\"\ntotal_timeout_ms = 600000\n",
            Path::new("/etc/tollgate"),
        )
        .unwrap();
        assert!(
            c.store.lease_ttl > Duration::from_secs(600),
            "{:?}",
            c.store.lease_ttl
        );
    }

    #[test]
    fn unknown_keys_do_not_hide_other_problems() {
        let p = problems(
            "[server]\ncolour = 1\n[[upstreams]]\nname = \"u\"\naddress = \"127.0.0.1:9\"\nkeepalive_x = 2\n[[routes]]\nmethod = \"get\"\npath = \"/a\"\nupstream = \"u\"\nservice = \"NOPE\"\nmethod_group = \"PLAN\"\noperation = \"abc\"\npointz = []\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "server.colour",
            "upstreams[0].keepalive_x",
            "routes[0].pointz",
            "routes[0].method",
            "routes[0].service",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(p[0].message.contains("(line 2)"), "{p:?}");
    }

    #[test]
    fn the_anonymous_name_is_no_users_and_no_companys() {
        let p = problems(
            "[[users]]\nusername = \"anonymous\"\npassword = \"pw-12345678\"\ncompany_key = \"acme\"\n[[users]]\nusername = \"bob\"\npassword = \"pw-12345678\"\ncompany_key = \"anonymous\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["users[0].username", "users[1].company_key"], "{p:?}");
        assert!(p[0].message.contains("reserved"), "{p:?}");
    }

    #[test]
    fn an_account_whose_client_label_would_be_cut_is_refused() {
        let p = problems(&format!(
            "[[users]]\nusername = \"{}\"\npassword = \"pw-12345678\"\ncompany_key = \"{}\"\n",
            "u".repeat(200),
            "c".repeat(200)
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "users[0].company_key");
        assert!(
            p[0].message.contains("at most 256 characters (403 here)"),
            "{p:?}"
        );
    }

    #[test]
    fn quotas_past_the_apis_bounds_are_refused() {
        let p = problems(
            "[[quotas]]\nservice = \"UNIVERSAL\"\nmethod_group = \"PLAN\"\nmax_concurrent_execution = 100000\npoints_per_request = 1000001\n",
        );
        let found: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            found,
            [
                "quotas[0].points_per_request: 1000001 is out of range 0..=1000000",
                "quotas[0].max_concurrent_execution: 100000 is out of range 0..=1000"
            ],
            "{p:?}"
        );
    }

    #[test]
    fn values_of_the_wrong_type_and_missing_keys_do_not_hide_other_problems() {
        let p = problems(
            r#"
            [limits]
            max_body_bytes = "big"
            colour = 1
            [metrics]
            listen = 9090
            [[upstreams]]
            name = "u"
            address = "127.0.0.1:9"
            [[routes]]
            method = 5
            path = "/a"
            upstream = "u"
            service = "NOPE"
            method_group = "PLAN"
            operation = "abc"
            auth = "yes"
            extra = 1
            [[routes]]
            path = "/b"
            upstream = "u"
            service = "UNIVERSAL"
            method_group = "PLAN"
            operation = "abc"
            "#,
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "limits.max_body_bytes",
            "limits.colour",
            "metrics.listen",
            "routes[0].method",
            "routes[0].auth",
            "routes[0].extra",
            "routes[0].service",
            "routes[1].method",
        ] {
            assert!(keys.contains(&k), "{k} missing from {p:?}");
        }
        // Each once: a key dropped for its type is not reported again as missing or empty.
        assert_eq!(keys.len(), 8, "{p:?}");
        let method = p.iter().find(|p| p.key == "routes[0].method").unwrap();
        assert!(method.message.contains("expected a string"), "{method:?}");
        let limit = p.iter().find(|p| p.key == "limits.max_body_bytes").unwrap();
        assert!(
            limit.message.contains("expected an integer") && limit.message.contains("(line 3)"),
            "{limit:?}"
        );
        let missing = p.iter().find(|p| p.key == "routes[1].method").unwrap();
        assert!(missing.message.contains("required"), "{missing:?}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let p = problems(
            r#"
            [server]
            listen = "nowhere"
            threads = 0
            [[upstreams]]
            name = "u"
            address = "127.0.0.1:9"
            [[routes]]
            method = "get"
            path = "/a/{id}"
            upstream = "v"
            service = "NOPE"
            method_group = "PLAN"
            operation = "ab"
            process_id = "pid"
            "#,
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "server.listen",
            "server.threads",
            "routes[0].method",
            "routes[0].upstream",
            "routes[0].service",
            "routes[0].operation",
            "routes[0].process_id",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn what_would_silently_never_apply_is_a_problem() {
        let p = problems(
            r#"
            [[upstreams]]
            name = "u"
            address = "127.0.0.1:9"
            [[upstreams]]
            name = "u"
            address = "127.0.0.1:10"
            [[routes]]
            method = "GET"
            path = "/account/info"
            upstream = "u"
            service = "UNIVERSAL"
            method_group = "PLAN"
            operation = "abc"
            redact = ["/a/~", "/b/~2", "/ok~0~1"]
            [[quotas]]
            service = "UNIVERSAL"
            method_group = "PLAN"
            points_per_day = 5
            [[quotas]]
            service = "UNIVERSAL"
            method_group = "PLAN"
            points_per_day = 6
            [[quotas]]
            service = "UNIVERSAL"
            method_group = "PLAN"
            company = "acme"
            points_per_day = 7
            [[users]]
            username = "weak"
            company_key = "acme"
            password_hash = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
            "#,
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstreams[1].name",
                "routes[0].path",
                "routes[0].redact[0]",
                "routes[0].redact[1]",
                "quotas[1]",
                "users[0].password_hash",
            ],
            "{p:?}"
        );
    }

    #[test]
    fn users_need_exactly_one_password_form_and_valid_names() {
        let p = problems("[[users]]\nusername = \"a\"\ncompany_key = \"acme\"\n");
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&"users[0].username") && keys.contains(&"users[0].password"),
            "{keys:?}"
        );
    }

    #[test]
    fn a_route_an_earlier_one_matches_in_whole_is_refused() {
        let route = |method: &str, path: &str| {
            format!("[[routes]]\nmethod = \"{method}\"\npath = \"{path}\"\nupstream = \"u\"\nservice = \"UNIVERSAL\"\nmethod_group = \"PLAN\"\noperation = \"abc\"\n")
        };
        let upstream = "[[upstreams]]\nname = \"u\"\naddress = \"127.0.0.1:9\"\n";
        let p = problems(
            &[
                upstream.to_string(),
                route("GET", "/a"),
                route("GET", "/a"),
                route("GET", "/b/{id}"),
                route("GET", "/b/{x}"),
                route("*", "/c/*"),
                route("GET", "/c/d"),
                // Reachable: another method, or more specific first.
                route("POST", "/a"),
                route("GET", "/e/lit"),
                route("GET", "/e/{id}"),
                // A HEAD is served by the first GET route that matches it.
                route("HEAD", "/e/lit"),
            ]
            .concat(),
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["routes[1]", "routes[3]", "routes[5]", "routes[9]"],
            "{p:?}"
        );
        assert!(p[0].message.contains("routes[0]"), "{p:?}");
        assert!(p[2].message.contains("routes[4]"), "{p:?}");
    }

    #[test]
    fn an_upstream_is_an_address_or_a_host_name_resolved_at_start() {
        let config =
            |address: &str| format!("[[upstreams]]\nname = \"u\"\naddress = \"{address}\"\n");
        let mut c = parse(&config("localhost:8090"), Path::new("/etc/tollgate")).unwrap();
        assert_eq!(c.upstreams[0].authority, "localhost:8090");
        assert_eq!(
            c.upstreams[0].address.port(),
            0,
            "not resolved before start"
        );
        resolve_upstreams(&mut c).unwrap();
        assert!(c.upstreams[0].address.ip().is_loopback());
        assert_eq!(c.upstreams[0].address.port(), 8090);
        let mut c = parse(&config("[::1]:9"), Path::new("/etc/tollgate")).unwrap();
        resolve_upstreams(&mut c).unwrap();
        assert_eq!(c.upstreams[0].address, "[::1]:9".parse().unwrap());
        assert_eq!(c.upstreams[0].authority, "[::1]:9");
        for (bad, says) in [
            ("localhost", "host:port"),
            ("localhost:http", "port"),
            ("::1:9", "host:port"),
            (":80", "host:port"),
        ] {
            let p = problems(&config(bad));
            assert_eq!(p[0].key, "upstreams[0].address", "{bad}: {p:?}");
            assert!(p[0].message.contains(says), "{bad}: {p:?}");
        }
    }

    /// Every leaf key of a table, as the key paths problems name (`routes[0].points[1]`).
    fn leaf_keys(value: &::toml::Value, at: &str, out: &mut Vec<String>) {
        match value {
            ::toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    leaf_keys(v, &path, out);
                }
            }
            ::toml::Value::Array(a) if a.iter().all(|v| v.is_table()) && !a.is_empty() => {
                for (i, v) in a.iter().enumerate() {
                    leaf_keys(v, &format!("{at}[{i}]"), out);
                }
            }
            _ => out.push(at.to_string()),
        }
    }

    #[test]
    fn every_key_of_the_example_given_the_wrong_type_is_named_and_nothing_else_is_lost() {
        let text = include_str!("../../config/example.toml");
        let example: ::toml::Value = ::toml::from_str(text).unwrap();
        let mut keys = Vec::new();
        leaf_keys(&example, "", &mut keys);
        assert!(keys.len() > 40, "{keys:?}");
        // With a second wrong value elsewhere, which the first must not hide.
        for key in &keys {
            let mut broken = example.clone();
            let wrong = match take_key(&mut broken, key).unwrap() {
                ::toml::Value::String(_) => ::toml::Value::Integer(5),
                _ => ::toml::Value::String("wrong".into()),
            };
            set_key(&mut broken, key, wrong).unwrap();
            if key != "server.threads" {
                set_key(
                    &mut broken,
                    "server.threads",
                    ::toml::Value::String("x".into()),
                )
                .unwrap();
            }
            let text = ::toml::to_string(&broken).unwrap();
            let p = parse(&text, Path::new("/etc/tollgate")).unwrap_err();
            let named: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
            assert!(named.contains(&key.as_str()), "{key}: {p:?}");
            assert!(named.contains(&"server.threads"), "{key}: {p:?}");
            assert!(p.len() <= 3, "{key}: one wrong value, many problems: {p:?}");
        }
    }

    #[test]
    fn a_bad_element_of_an_array_does_not_hide_other_problems() {
        let p = problems(
            "[server]\nthreads = \"x\"\n[auth]\nprevious_secrets = [5]\n[[upstreams]]\nname = \"u\"\naddress = \"127.0.0.1:9\"\n\
             [[routes]]\npath = \"/a/*\"\nupstream = \"u\"\nservice = \"UNIVERSAL\"\nmethod_group = \"PLAN\"\noperation = \"abc\"\nroles = [5]\n\
             [[routes]]\nmethod = \"POST\"\npath = \"/a/b\"\nupstream = \"u\"\nservice = \"UNIVERSAL\"\nmethod_group = \"PLAN\"\noperation = \"abc\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        // routes[0] has no method: reported, and not taken for a route of every method that
        // would leave routes[1] unreached.
        assert_eq!(
            keys,
            [
                "server.threads",
                "auth.previous_secrets[0]",
                "routes[0].roles[0]",
                "routes[0].method"
            ],
            "{p:?}"
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        let p = problems("[auth]\nprevious_secrets = [\"x\", \"\"]\n");
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["auth.previous_secrets[0]", "auth.previous_secrets[1]"]
        );
        let p = problems("[auth]\nsecret = \"short\"\n");
        assert_eq!(p[0].key, "auth.secret");
    }
}
