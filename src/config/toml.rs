//! The config file as written: serde structs mirroring the TOML, every table closed to unknown
//! keys. Nothing outside `config` sees these; `internal` turns them into the validated model.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub store: Store,
    #[serde(default)]
    pub auth: Auth,
    pub metrics: Option<Metrics>,
    pub demo_upstream: Option<DemoUpstream>,
    #[serde(default)]
    pub docs: Docs,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub quotas: Vec<Quota>,
    #[serde(default)]
    pub users: Vec<User>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub listen: Option<String>,
    pub name: Option<String>,
    pub threads: Option<i64>,
    pub log_format: Option<String>,
    pub grace_period_seconds: Option<i64>,
    pub shutdown_timeout_seconds: Option<i64>,
    pub keepalive_timeout_seconds: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_body_bytes: Option<i64>,
    pub max_capture_bytes: Option<i64>,
    pub client_read_timeout_ms: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub path: Option<String>,
    pub flush_interval_ms: Option<i64>,
    pub durability: Option<String>,
    pub payload_retention_days: Option<i64>,
    pub audit_retention_days: Option<i64>,
    pub queue_capacity: Option<i64>,
    pub lease_ttl_seconds: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub previous_secrets: Option<Vec<String>>,
    pub login_failures_per_account_per_minute: Option<i64>,
    pub login_failures_per_address_per_minute: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoUpstream {
    pub listen: String,
    pub compute_time_ms: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Docs {
    pub dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    pub address: String,
    pub connect_timeout_ms: Option<i64>,
    pub total_timeout_ms: Option<i64>,
    pub idle_timeout_seconds: Option<i64>,
    pub keepalive: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub method: String,
    pub path: String,
    pub upstream: String,
    pub service: String,
    pub method_group: String,
    pub operation: String,
    pub points: Option<Vec<String>>,
    pub unique_key: Option<String>,
    pub process_id: Option<String>,
    pub auth: Option<bool>,
    pub roles: Option<Vec<String>>,
    pub total_timeout_ms: Option<i64>,
    pub requests_per_second: Option<i64>,
    pub capture: Option<bool>,
    pub redact: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub service: String,
    pub method_group: String,
    pub company: Option<String>,
    pub user: Option<String>,
    pub points_per_request: Option<i64>,
    pub points_per_day: Option<i64>,
    pub points_per_date_window: Option<i64>,
    pub date_window_days: Option<i64>,
    pub max_concurrent_execution: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub username: String,
    pub password: Option<String>,
    pub password_hash: Option<String>,
    pub company_key: String,
    pub roles: Option<Vec<String>>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub timezone: Option<i64>,
}
