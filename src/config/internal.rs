//! The validated config model the rest of Tollgate reads. Every value here has passed its
//! rule; defaults are applied; names are resolved (a route holds its upstream's index).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{MethodGroup, Role, ServiceName};
use crate::quota::points::PointsRule;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub limits: Limits,
    pub store: Store,
    pub auth: Auth,
    pub metrics_listen: Option<SocketAddr>,
    pub demo_upstream: Option<DemoUpstream>,
    pub docs_dir: PathBuf,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub quotas: Vec<Quota>,
    pub users: Vec<UserSeed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    /// The `server` of every tracedata.
    pub name: Arc<str>,
    pub threads: usize,
    pub log_format: LogFormat,
    pub grace_period_seconds: u64,
    pub shutdown_timeout_seconds: u64,
    /// How long a caller's connection may wait for its next request (and a request head take
    /// to arrive) before it is closed.
    pub keepalive_timeout_seconds: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_capture_bytes: usize,
    /// How long a read of the caller's request may wait for bytes before the call is given
    /// up (a client that stopped sending mid-body gets a 408), and a write of its answer for
    /// room (a client that stopped reading loses its connection).
    pub client_read_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Committed points reach the disk within `flush_interval`.
    Buffered,
    /// A commit is on disk before the response completes.
    Strict,
}

#[derive(Debug, Clone)]
pub struct Store {
    pub path: PathBuf,
    pub flush_interval: Duration,
    pub durability: Durability,
    pub payload_retention_days: u32,
    pub audit_retention_days: u32,
    pub queue_capacity: usize,
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub secret: Option<String>,
    pub secret_file: PathBuf,
    pub previous_secrets: Vec<String>,
    pub login_failures_per_account_per_minute: u32,
    pub login_failures_per_address_per_minute: u32,
}

#[derive(Debug, Clone)]
pub struct DemoUpstream {
    pub listen: SocketAddr,
    pub compute_time: Duration,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// Resolved once, at start.
    pub address: SocketAddr,
    /// As written (`host:port`): the `Host` of a call whose caller sent none.
    pub authority: String,
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive: usize,
}

/// A piece of a route's path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `{name}`: any one non-empty segment.
    Param(String),
    /// A trailing `*`: whatever follows (a prefix route).
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    pub segments: Vec<Segment>,
}

impl PathPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let rest = pattern.strip_prefix('/').ok_or("must start with '/'")?;
        let parts: Vec<&str> = if rest.is_empty() {
            vec![]
        } else {
            rest.split('/').collect()
        };
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = if *part == "*" {
                if i + 1 != parts.len() {
                    return Err("'*' may only end the pattern".into());
                }
                Segment::Rest
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if !crate::model::is_word(name) {
                    return Err(format!("parameter '{{{name}}}' must be a word"));
                }
                if segments
                    .iter()
                    .any(|s| matches!(s, Segment::Param(other) if other == name))
                {
                    return Err(format!("parameter '{{{name}}}' is named twice"));
                }
                Segment::Param(name.to_string())
            } else if part.is_empty() && i + 1 == parts.len() {
                return Err("ends with '/': route paths are written without a trailing '/'".into());
            } else if part.is_empty() {
                return Err("empty segment ('//')".into());
            } else if part.contains(['{', '}', '*', '?', '#']) {
                return Err(format!(
                    "segment '{part}' mixes literal text and pattern characters"
                ));
            } else {
                Segment::Literal(part.to_string())
            };
            segments.push(segment);
        }
        Ok(PathPattern { segments })
    }

    /// Whether every path this pattern matches is matched by `other` too.
    pub fn within(&self, other: &PathPattern) -> bool {
        let mut mine = self.segments.iter();
        for theirs in &other.segments {
            match (theirs, mine.next()) {
                // Whatever follows, none included.
                (Segment::Rest, _) => return true,
                (_, None | Some(Segment::Rest)) => return false,
                (Segment::Literal(a), Some(Segment::Literal(b))) if a == b => {}
                (Segment::Param(_), Some(Segment::Literal(_) | Segment::Param(_))) => {}
                _ => return false,
            }
        }
        mine.next().is_none()
    }

    /// Whether `path` (no query) matches; on a match, the value of parameter `param` if asked.
    pub fn matches<'p>(&self, path: &'p str, param: Option<&str>) -> Option<Option<&'p str>> {
        let rest = path.strip_prefix('/')?;
        if self.segments.is_empty() {
            return rest.is_empty().then_some(None);
        }
        let mut parts = rest.split('/');
        let mut found = None;
        for segment in &self.segments {
            match segment {
                Segment::Rest => return Some(found),
                Segment::Literal(lit) => {
                    if parts.next()? != lit {
                        return None;
                    }
                }
                Segment::Param(name) => {
                    let part = parts.next().filter(|p| !p.is_empty())?;
                    if param == Some(name.as_str()) {
                        found = Some(part);
                    }
                }
            }
        }
        parts.next().is_none().then_some(found)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodMatch {
    Any,
    One(http::Method),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub method: MethodMatch,
    pub pattern: PathPattern,
    pub upstream: usize,
    pub service: ServiceName,
    pub method_group: MethodGroup,
    pub operation: Arc<str>,
    pub points: PointsRule,
    /// The `{name}` of the pattern that carries an asynchronous process's tracecode.
    pub process_id: Option<String>,
    pub auth: bool,
    /// Empty: any authenticated role.
    pub roles: Vec<Role>,
    pub total_timeout: Option<Duration>,
    pub requests_per_second: Option<u32>,
    pub capture: bool,
    /// JSON pointers replaced in what is stored, never in what is forwarded.
    pub redact: Vec<String>,
}

/// Quota values; `None` = not set at this level (inherit), and unlimited when nothing sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuotaValues {
    pub points_per_request: Option<u64>,
    pub points_per_day: Option<u64>,
    pub points_per_date_window: Option<u64>,
    pub date_window_days: Option<u32>,
    pub max_concurrent_execution: Option<u32>,
}

/// The bounds of each quota, the API's (`QuotasResult` in API.md; a window of N >= 2 days, at
/// most a year): the configuration, `tollgate user set-quota` and the admin socket all hold
/// quotas to them, so `/account/quota` can always show what is enforced.
pub mod quota_bounds {
    pub const POINTS_PER_REQUEST: (u64, u64) = (0, 1_000_000);
    pub const POINTS_PER_DAY: (u64, u64) = (0, 100_000_000);
    pub const POINTS_PER_DATE_WINDOW: (u64, u64) = (0, 100_000_000);
    pub const DATE_WINDOW_DAYS: (u64, u64) = (2, 366);
    pub const MAX_CONCURRENT_EXECUTION: (u64, u64) = (0, 1000);
}

impl QuotaValues {
    /// Each value by its key name, with its bound (see [`quota_bounds`]).
    fn named(&self) -> [(&'static str, Option<u64>, (u64, u64)); 5] {
        use quota_bounds::*;
        [
            (
                "points_per_request",
                self.points_per_request,
                POINTS_PER_REQUEST,
            ),
            ("points_per_day", self.points_per_day, POINTS_PER_DAY),
            (
                "points_per_date_window",
                self.points_per_date_window,
                POINTS_PER_DATE_WINDOW,
            ),
            (
                "date_window_days",
                self.date_window_days.map(u64::from),
                DATE_WINDOW_DAYS,
            ),
            (
                "max_concurrent_execution",
                self.max_concurrent_execution.map(u64::from),
                MAX_CONCURRENT_EXECUTION,
            ),
        ]
    }

    /// Every value set that is out of its bound (see [`quota_bounds`]), as "name: rule".
    pub fn out_of_bounds(&self) -> Vec<String> {
        self.named()
            .into_iter()
            .filter_map(|(name, value, (min, max))| {
                let v = value?;
                (v < min || v > max).then(|| format!("{name}: {v} is out of range {min}..={max}"))
            })
            .collect()
    }

    /// The values set, as "name = value, ..." (or that none is).
    pub fn describe(&self) -> String {
        let set: Vec<String> = self
            .named()
            .into_iter()
            .filter_map(|(name, value, _)| Some(format!("{name} = {}", value?)))
            .collect();
        if set.is_empty() {
            "no values (all inherited)".to_string()
        } else {
            set.join(", ")
        }
    }

    /// Every value set held to its bound (see [`quota_bounds`]). Stores written before the
    /// bounds were enforced may hold values past them (a window of four billion days): what is
    /// enforced is always what `/account/quota` can show.
    pub fn clamped(self) -> QuotaValues {
        let [per_request, per_day, per_window, window_days, concurrent] = self
            .named()
            .map(|(_, value, (min, max))| value.map(|v| v.clamp(min, max)));
        // Every bound of the two u32 values fits a u32.
        QuotaValues {
            points_per_request: per_request,
            points_per_day: per_day,
            points_per_date_window: per_window,
            date_window_days: window_days.map(|v| v as u32),
            max_concurrent_execution: concurrent.map(|v| v as u32),
        }
    }

    /// `self` over `base`: every value `self` sets wins, the rest are inherited.
    pub fn over(self, base: QuotaValues) -> QuotaValues {
        QuotaValues {
            points_per_request: self.points_per_request.or(base.points_per_request),
            points_per_day: self.points_per_day.or(base.points_per_day),
            points_per_date_window: self.points_per_date_window.or(base.points_per_date_window),
            date_window_days: self.date_window_days.or(base.date_window_days),
            max_concurrent_execution: self
                .max_concurrent_execution
                .or(base.max_concurrent_execution),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaScope {
    Default,
    Company(String),
    User(String),
}

#[derive(Debug, Clone)]
pub struct Quota {
    pub service: ServiceName,
    pub method_group: MethodGroup,
    pub scope: QuotaScope,
    pub values: QuotaValues,
}

#[derive(Debug, Clone)]
pub enum PasswordSeed {
    Plain(String),
    /// A PHC string (`$argon2id$...`).
    Hash(String),
}

#[derive(Debug, Clone)]
pub struct UserSeed {
    pub username: String,
    pub password: PasswordSeed,
    pub company_key: String,
    pub roles: Vec<Role>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub timezone: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_patterns_match_exactly() {
        let p = PathPattern::parse("/universal/plan/calculation").unwrap();
        assert_eq!(p.matches("/universal/plan/calculation", None), Some(None));
        assert_eq!(p.matches("/universal/plan/calculation/", None), None);
        assert_eq!(p.matches("/universal/plan/calculation/x", None), None);
        assert_eq!(p.matches("/universal/plan", None), None);
    }

    #[test]
    fn params_capture_one_segment() {
        let p = PathPattern::parse("/universal/plan/result/{id}").unwrap();
        assert_eq!(
            p.matches("/universal/plan/result/abc", Some("id")),
            Some(Some("abc"))
        );
        assert_eq!(p.matches("/universal/plan/result/abc", None), Some(None));
        assert_eq!(p.matches("/universal/plan/result/", Some("id")), None);
        assert_eq!(p.matches("/universal/plan/result/a/b", Some("id")), None);
        let v = PathPattern::parse("/{service}/system/version").unwrap();
        assert!(v.matches("/routing/system/version", None).is_some());
    }

    #[test]
    fn star_matches_any_rest() {
        let p = PathPattern::parse("/routing/*").unwrap();
        assert!(p.matches("/routing/matrix/calculation", None).is_some());
        assert!(p.matches("/routing/", None).is_some());
        assert!(p.matches("/universal/x", None).is_none());
        let root = PathPattern::parse("/").unwrap();
        assert!(root.matches("/", None).is_some());
        assert!(root.matches("/x", None).is_none());
    }

    #[test]
    fn bad_patterns_say_why() {
        assert!(PathPattern::parse("x").unwrap_err().contains("start"));
        assert!(PathPattern::parse("/a/*/b").unwrap_err().contains("end"));
        assert!(PathPattern::parse("/a//b").unwrap_err().contains("empty"));
        assert!(PathPattern::parse("/a/b/")
            .unwrap_err()
            .contains("trailing"));
        assert!(PathPattern::parse("/a/{b-c}").unwrap_err().contains("word"));
        assert!(PathPattern::parse("/r/{id}/{id}/x")
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn a_pattern_is_within_another_when_the_other_matches_all_it_does() {
        let p = |s: &str| PathPattern::parse(s).unwrap();
        for (inner, outer) in [
            ("/a", "/a"),
            ("/b/{id}", "/b/{x}"),
            ("/b/lit", "/b/{x}"),
            ("/c/d", "/c/*"),
            ("/c", "/c/*"),
            ("/c/*", "/c/*"),
            ("/c/{id}/*", "/*"),
            ("/", "/*"),
        ] {
            assert!(p(inner).within(&p(outer)), "{inner} within {outer}");
        }
        for (inner, outer) in [
            ("/b/{x}", "/b/lit"),
            ("/c/*", "/c/d"),
            ("/c/*", "/c"),
            ("/a/b", "/a"),
            ("/a", "/a/b"),
            ("/a", "/b"),
            ("/", "/a"),
            ("/c/*", "/c/{x}"),
        ] {
            assert!(!p(inner).within(&p(outer)), "{inner} not within {outer}");
        }
    }

    #[test]
    fn overrides_inherit_what_they_do_not_set() {
        let base = QuotaValues {
            points_per_day: Some(100),
            max_concurrent_execution: Some(5),
            ..Default::default()
        };
        let user = QuotaValues {
            points_per_day: Some(10),
            ..Default::default()
        };
        let merged = user.over(base);
        assert_eq!(merged.points_per_day, Some(10));
        assert_eq!(merged.max_concurrent_execution, Some(5));
        assert_eq!(merged.points_per_request, None);
    }
}
