//! The state every request shares: config, users and tokens, quotas and the ledger, the
//! process registry, the store and its writer, and the metrics. Built once at start by
//! `server`, read by `proxy` and `account`.

use std::sync::atomic::{AtomicBool, Ordering};
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
    pub draining: Draining,
}

/// Set once the server begins to shut down (SIGTERM): from then on answers close their
/// connections, and connections waiting for their next request are closed, so the drain waits
/// only for the calls already in flight.
#[derive(Default)]
pub struct Draining {
    flag: AtomicBool,
    /// When it began (the first `begin`).
    began: std::sync::OnceLock<std::time::SystemTime>,
    notify: tokio::sync::Notify,
    /// Requests being read or served (account API and proxied alike): the drain waits for them.
    active: std::sync::atomic::AtomicUsize,
}

/// One request being read or served; counted in [`Draining::active`] until dropped.
pub struct Active<'a>(&'a Draining);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Draining {
    /// Counts a request (from the wait for its head to its answer's end) until the guard drops.
    pub fn enter(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self)
    }

    /// How many requests are being read or served.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn begin(&self) {
        self.began.get_or_init(std::time::SystemTime::now);
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Whether the drain had begun by `at`.
    pub fn had_begun_by(&self, at: std::time::SystemTime) -> bool {
        self.is_set() && self.began.get().is_some_and(|began| *began <= at)
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Whether a connection accepted at `at` came after the drain's first `grace` had passed:
    /// the listener is as good as closed to it.
    pub fn closed_to_new_by(&self, at: std::time::SystemTime, grace: std::time::Duration) -> bool {
        self.is_set() && self.began.get().is_some_and(|began| *began + grace <= at)
    }

    /// Resolves once the drain has begun.
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a drain begun between the two still wakes this.
        notified.as_mut().enable();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}

impl App {
    /// Loads committed points of the recent days into the ledger, so a restart (or a crash)
    /// does not hand out a fresh budget: as many days as the widest date window any quota sets
    /// (in the configuration or an account's own), and at least the month the ledger keeps.
    pub fn restore_ledger(&self) -> Result<usize, String> {
        // The accounts as the authority loaded them at start; not read from the store again.
        let users = self.authority.users();
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
        let rows = self
            .store
            .stats_since(first_day_of_window(widest))
            .map_err(|e| e.to_string())?;
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

    /// Loads one account's committed points of its last `days` days where the ledger holds
    /// fewer: after its date window was widened on a running server, the days the window newly
    /// covers count at once, not only from the next start.
    pub fn restore_account(&self, username: &str, days: u32) -> Result<(), String> {
        let rows = self
            .store
            .stats(
                username,
                first_day_of_window(days),
                crate::store::Store::now_day(),
            )
            .map_err(|e| e.to_string())?;
        let name: Arc<str> = Arc::from(username);
        for (day, service, group, counts) in rows {
            self.ledger
                .restore_at_least((name.clone(), service, group), day, counts.points);
        }
        Ok(())
    }
}

/// The first UTC day whose committed points a date window of `days` can reach: one day more,
/// since the oldest local day of a user east of UTC starts the day before. Windows stored before
/// the bounds were enforced could name more than a year; they reach a year.
fn first_day_of_window(days: u32) -> crate::quota::ledger::Day {
    let days = days.min(crate::config::quota_bounds::DATE_WINDOW_DAYS.1 as u32);
    crate::store::Store::now_day() - days as i32 - 1
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

    /// A store whose alice spent 70 points 40 days ago, opened anew (a restart) by a server
    /// whose configured date window is `window_days`.
    fn restarted_with_old_points(dir: &std::path::Path, window_days: u32) -> Arc<super::App> {
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
date_window_days = {window_days}
"#,
            dir.join("store").display(),
            "ab".repeat(32)
        );
        let today = Store::now_day();
        {
            let config = crate::config::parse(&config, dir).unwrap();
            let (app, writer_thread) = crate::server::build_app(config).unwrap();
            app.writer
                .record_blocking(Box::new(charged_call(today - 40, 70)))
                .unwrap();
            app.writer
                .flush_blocking(std::time::Duration::from_secs(60))
                .unwrap();
            drop(app);
            writer_thread.join().unwrap();
        }
        let config = crate::config::parse(&config, dir).unwrap();
        crate::server::build_app(config).unwrap().0
    }

    fn window_of(days: u32) -> crate::quota::ledger::Limits {
        crate::quota::to_limits(crate::config::QuotaValues {
            points_per_date_window: Some(100),
            date_window_days: Some(days),
            ..Default::default()
        })
    }

    fn admits(app: &super::App, days: u32, points: u64) -> bool {
        let key = (
            Arc::from("alice"),
            ServiceName::UNIVERSAL,
            MethodGroup::PLAN,
        );
        let now = Today::at(chrono::Utc::now().timestamp(), 0);
        app.ledger
            .admit(&key, &window_of(days), points, now, Instant::now())
            .is_ok()
    }

    #[test]
    fn a_restart_restores_the_widest_date_window_not_only_a_month() {
        let dir = tempfile::tempdir().unwrap();
        let app = restarted_with_old_points(dir.path(), 60);
        // 70 of the window's 100 points were spent 40 days ago, before the restart.
        assert!(!admits(&app, 60, 31));
        assert!(admits(&app, 60, 30));
    }

    #[test]
    fn a_window_widened_on_a_running_server_counts_the_days_it_newly_covers() {
        let dir = tempfile::tempdir().unwrap();
        let app = restarted_with_old_points(dir.path(), 7);
        // Widened to 60 days (as `tollgate user set-quota` does through the admin socket): the
        // 70 points of 40 days ago count at once.
        app.restore_account("alice", 60).unwrap();
        assert!(!admits(&app, 60, 31));
        assert!(admits(&app, 60, 30));
        // Asked again, nothing is counted twice (each admission above was refunded when its
        // lease was dropped): still 70 of 100 in use.
        app.restore_account("alice", 60).unwrap();
        assert!(!admits(&app, 60, 31));
        assert!(admits(&app, 60, 30));
    }
}
