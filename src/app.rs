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
    /// does not hand out a fresh budget.
    pub fn restore_ledger(&self) -> Result<usize, String> {
        let since =
            crate::store::Store::now_day() - crate::quota::ledger::MIN_RETAINED_DAYS as i32 - 1;
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
