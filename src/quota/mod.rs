//! Points and quotas: counting a body's points (`points`), the atomic in-memory ledger that
//! admits and settles calls (`ledger`), and here, which quota applies to whom: defaults per
//! (service, method group) from the config, overridden per company, then per user (config or
//! `tollgate user set-quota`), each level inheriting what it does not set.

pub mod ledger;
pub mod points;

use std::collections::BTreeSet;
use std::sync::Arc;

use foldhash::HashMap;

use crate::config::{Config, QuotaScope, QuotaValues};
use crate::model::{MethodGroup, ServiceName};
use crate::store::UserRecord;

/// The ledger is kept per (user, service, method group).
pub type LedgerKey = (Arc<str>, ServiceName, MethodGroup);

/// The window length when a quota sets `points_per_date_window` without `date_window_days`
/// at any level.
pub const DEFAULT_DATE_WINDOW_DAYS: u32 = 7;

type Pair = (ServiceName, MethodGroup);

pub struct Quotas {
    defaults: HashMap<Pair, QuotaValues>,
    companies: HashMap<String, HashMap<Pair, QuotaValues>>,
    users: HashMap<String, HashMap<Pair, QuotaValues>>,
    /// Every pair a route or a quota names: what /account/quota lists.
    pairs: BTreeSet<Pair>,
}

impl Quotas {
    pub fn from_config(config: &Config) -> Quotas {
        let mut q = Quotas {
            defaults: HashMap::default(),
            companies: HashMap::default(),
            users: HashMap::default(),
            pairs: BTreeSet::new(),
        };
        for quota in &config.quotas {
            let pair = (quota.service, quota.method_group);
            q.pairs.insert(pair);
            let slot = match &quota.scope {
                QuotaScope::Default => q.defaults.entry(pair).or_default(),
                QuotaScope::Company(c) => q
                    .companies
                    .entry(c.clone())
                    .or_default()
                    .entry(pair)
                    .or_default(),
                QuotaScope::User(u) => q
                    .users
                    .entry(u.clone())
                    .or_default()
                    .entry(pair)
                    .or_default(),
            };
            *slot = quota.values.over(*slot);
        }
        for route in &config.routes {
            q.pairs.insert((route.service, route.method_group));
        }
        q
    }

    /// The quota values that apply to `user` for one pair (None = unlimited).
    pub fn effective(
        &self,
        user: &UserRecord,
        service: ServiceName,
        group: MethodGroup,
    ) -> QuotaValues {
        let pair = (service, group);
        let mut v = self.defaults.get(&pair).copied().unwrap_or_default();
        if let Some(c) = self
            .companies
            .get(&user.company_key)
            .and_then(|m| m.get(&pair))
        {
            v = c.over(v);
        }
        if let Some(u) = self.users.get(&user.username).and_then(|m| m.get(&pair)) {
            v = u.over(v);
        }
        if let Some(stored) = user
            .quotas
            .iter()
            .find(|q| q.service == service && q.method_group == group)
        {
            v = stored.values.clamped().over(v);
        }
        v
    }

    pub fn limits(
        &self,
        user: &UserRecord,
        service: ServiceName,
        group: MethodGroup,
    ) -> ledger::Limits {
        to_limits(self.effective(user, service, group))
    }

    /// Every (service, method group) with the user's effective values, for /account/quota.
    pub fn all_for(&self, user: &UserRecord) -> Vec<(ServiceName, MethodGroup, QuotaValues)> {
        let mut pairs = self.pairs.clone();
        pairs.extend(user.quotas.iter().map(|q| (q.service, q.method_group)));
        pairs
            .into_iter()
            .map(|(s, g)| (s, g, self.effective(user, s, g)))
            .collect()
    }
}

pub fn to_limits(v: QuotaValues) -> ledger::Limits {
    ledger::Limits {
        points_per_request: v.points_per_request,
        points_per_day: v.points_per_day,
        points_per_date_window: v.points_per_date_window,
        date_window_days: v.date_window_days.unwrap_or(DEFAULT_DATE_WINDOW_DAYS),
        max_concurrent_execution: v.max_concurrent_execution,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UserQuota;

    fn user(name: &str, company: &str) -> UserRecord {
        UserRecord {
            username: name.into(),
            password_hash: String::new(),
            company_key: company.into(),
            roles: vec![],
            name: None,
            email: None,
            phone: None,
            timezone: 0,
            token_version: 1,
            password_changed: false,
            quotas: vec![],
            company_days_from: None,
        }
    }

    #[test]
    fn user_over_company_over_default_each_inheriting() {
        let config = crate::config::parse(
            r#"
            [[quotas]]
            service = "UNIVERSAL"
            method_group = "PLAN"
            points_per_request = 100
            points_per_day = 1000
            max_concurrent_execution = 5
            [[quotas]]
            service = "UNIVERSAL"
            method_group = "PLAN"
            company = "acme"
            points_per_day = 5000
            [[quotas]]
            service = "UNIVERSAL"
            method_group = "PLAN"
            user = "alice"
            max_concurrent_execution = 1
            "#,
            std::path::Path::new("/"),
        )
        .unwrap();
        let q = Quotas::from_config(&config);
        let (s, g) = (ServiceName::UNIVERSAL, MethodGroup::PLAN);
        let alice = q.effective(&user("alice", "acme"), s, g);
        assert_eq!(
            (
                alice.points_per_request,
                alice.points_per_day,
                alice.max_concurrent_execution
            ),
            (Some(100), Some(5000), Some(1))
        );
        let bob = q.effective(&user("bob", "acme"), s, g);
        assert_eq!(
            (bob.points_per_day, bob.max_concurrent_execution),
            (Some(5000), Some(5))
        );
        let carol = q.effective(&user("carol", "other"), s, g);
        assert_eq!(carol.points_per_day, Some(1000));
        assert_eq!(
            q.effective(&user("carol", "other"), ServiceName::ROUTING, g),
            QuotaValues::default()
        );

        let mut dave = user("dave", "acme");
        dave.quotas.push(UserQuota {
            service: s,
            method_group: g,
            values: QuotaValues {
                points_per_day: Some(7),
                ..Default::default()
            },
        });
        assert_eq!(q.effective(&dave, s, g).points_per_day, Some(7));
        assert_eq!(
            q.limits(&dave, s, g).date_window_days,
            DEFAULT_DATE_WINDOW_DAYS
        );

        // A store written before the bounds held may carry values past them: what is enforced
        // is held to the bounds /account/quota shows.
        let mut erin = user("erin", "acme");
        erin.quotas.push(UserQuota {
            service: s,
            method_group: g,
            values: QuotaValues {
                points_per_day: Some(999_999_999_999),
                date_window_days: Some(4_000_000_000),
                points_per_date_window: Some(100),
                ..Default::default()
            },
        });
        let limits = q.limits(&erin, s, g);
        assert_eq!(limits.date_window_days, 366);
        assert_eq!(limits.points_per_day, Some(100_000_000));
        assert_eq!(limits.points_per_date_window, Some(100));
    }
}
