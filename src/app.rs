//! The state every request shares: config, users and tokens, quotas and the ledger, the
//! process registry, the store and its writer, and the metrics. Built once at start by
//! `server`, read by `proxy` and `account`.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Authority;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::quota::ledger::Ledger;
use crate::quota::{LedgerKey, Quotas};
use crate::store::writer::StoreWriter;
use crate::store::Store;
use crate::trace::ProcessRegistry;

pub struct App {
    pub config: Arc<Config>,
    pub authority: Arc<Authority>,
    pub quotas: Quotas,
    pub ledger: Arc<Ledger<LedgerKey>>,
    pub processes: ProcessRegistry,
    pub store: Arc<Store>,
    pub writer: StoreWriter,
    pub metrics: Metrics,
    pub started: Instant,
}

impl App {
    /// Loads committed points of the recent days into the ledger, so a restart (or a crash)
    /// does not hand out a fresh budget: as many days as the widest date window any quota sets
    /// (in the configuration or an account's own), and at least the month the ledger keeps.
    pub fn restore_ledger(&self) -> Result<usize, String> {
        let users = self.store.users().map_err(|e| e.to_string())?;
        let widest = users
            .iter()
            .flat_map(|u| &u.quotas)
            .filter_map(|q| q.values.date_window_days)
            .chain(
                self.config
                    .quotas
                    .iter()
                    .filter_map(|q| q.values.date_window_days),
            )
            .fold(crate::quota::ledger::MIN_RETAINED_DAYS, u32::max);
        // One more day: the oldest local day of a user east of UTC starts the day before.
        let since = crate::store::Store::now_day() - widest as i32 - 1;
        let rows = self.store.stats_since(since).map_err(|e| e.to_string())?;
        let n = rows.len();
        for (user, day, service, group, counts) in rows {
            self.ledger.restore(
                (Arc::from(user.as_str()), service, group),
                day,
                counts.points,
            );
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{MethodGroup, ServiceName};
    use crate::quota::ledger::Today;
    use crate::store::writer::CallRecord;
    use crate::store::{AuditRecord, ProcessRecord, Store};
    use std::sync::Arc;
    use std::time::Instant;

    fn charged_call(day: i32, points: u64) -> CallRecord {
        CallRecord {
            audit: AuditRecord {
                code: uuid::Uuid::new_v4(),
                username: "alice".into(),
                company_key: "acme".into(),
                service: ServiceName::UNIVERSAL,
                operation: "run_plan_calculation".into(),
                method_group: MethodGroup::PLAN,
                time_ms: i64::from(day) * 86_400_000 + 3_600_000,
                timezone: 0,
                points,
                unique_points: points,
                duration_us: 1000,
                status: 200,
            },
            process: ProcessRecord {
                owner: "alice".into(),
                company_key: "acme".into(),
                day,
                exchanges: 1,
            },
            findable: false,
            stage: 0,
            input: None,
            output: None,
            charged_day: Some(day),
            anonymous: false,
        }
    }

    #[test]
    fn a_restart_restores_the_widest_date_window_not_only_a_month() {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"
[store]
path = "{}"
[auth]
secret = "{}"
[[users]]
username = "alice"
password = "alice-password-1"
company_key = "acme"
[[quotas]]
service = "UNIVERSAL"
method_group = "PLAN"
points_per_date_window = 100
date_window_days = 60
"#,
            dir.path().join("store").display(),
            "ab".repeat(32)
        );
        let today = Store::now_day();
        {
            let config = crate::config::parse(&config, dir.path()).unwrap();
            let (app, writer_thread) = crate::server::build_app(config).unwrap();
            app.writer
                .record_blocking(Box::new(charged_call(today - 40, 70)))
                .unwrap();
            app.writer.flush_blocking().unwrap();
            drop(app);
            writer_thread.join().unwrap();
        }
        let config = crate::config::parse(&config, dir.path()).unwrap();
        let (app, _writer_thread) = crate::server::build_app(config).unwrap();
        let user = app.authority.user("alice").unwrap();
        let limits = app
            .quotas
            .limits(&user, ServiceName::UNIVERSAL, MethodGroup::PLAN);
        let key = (
            Arc::from("alice"),
            ServiceName::UNIVERSAL,
            MethodGroup::PLAN,
        );
        let now = Today::at(chrono::Utc::now().timestamp(), 0);
        // 70 of the window's 100 points were spent 40 days ago, before the restart.
        assert!(app
            .ledger
            .admit(&key, &limits, 31, now, Instant::now())
            .is_err());
        assert!(app
            .ledger
            .admit(&key, &limits, 30, now, Instant::now())
            .is_ok());
    }
}
