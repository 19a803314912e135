//! Prometheus metrics for operators. Labels are bounded by the config (service, method group,
//! status class, error kind): never user names or tokens. Per-route handles are resolved once
//! at start, so the hot path only bumps atomics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::config::Route;

/// Fine at the low end (proxy overhead is tens of microseconds), coarse up to a minute.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Handles for one route: requests by status class, and its latency histograms.
pub struct RouteMetrics {
    by_class: [IntCounter; 6],
    pub total_seconds: Histogram,
    pub upstream_seconds: Histogram,
}

impl RouteMetrics {
    pub fn count(&self, status: u16) {
        self.by_class[(status / 100).min(5) as usize].inc();
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub routes: Vec<RouteMetrics>,
    pub in_flight: IntGauge,
    pub upstream_errors: IntCounterVec,
    pub rejections: IntCounterVec,
    pub account_requests: IntCounterVec,
    pub store_queue: IntGauge,
    pub store_bytes: IntGauge,
}

/// The `kind` label of `upstream_errors_total`: every one is exported from the start, at 0, so
/// the first failure of a kind shows in `rate()` and `increase()`.
pub const UPSTREAM_ERROR_KINDS: [&str; 4] = ["connect", "timeout", "protocol", "aborted"];

/// The `reason` labels of `rejections_total` exported from the start (the quota's and the
/// proxy's common refusals; rarer ones appear when first counted).
const COMMON_REJECTIONS: [&str; 11] = [
    "no_route",
    "body_too_large",
    "invalid_json",
    "invalid_content_coding",
    "unreadable_content_coding",
    "store_backlog",
    "requests_per_second",
    "points_per_request",
    "points_per_day",
    "points_per_date_window",
    "max_concurrent_execution",
];

/// The `status_class` label by hundreds of the status; status 0 is a call that got no answer.
pub const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    pub fn new(routes: &[Route]) -> Metrics {
        let registry = Registry::new_custom(Some("tollgate".into()), None).expect("valid prefix");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Proxied requests by service, method group and status class of the answer Tollgate gave (1xx..5xx; none: the call was cut, at shutdown, before an answer was chosen). A caller that left while the upstream worked is counted by the answer it would have got",
            ),
            &["service", "method_group", "status_class"],
        )
        .expect("valid metric");
        let total = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request head to response end, per service",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            &["service", "method_group"],
        )
        .expect("valid metric");
        let upstream = HistogramVec::new(
            HistogramOpts::new(
                "upstream_duration_seconds",
                "Time the upstream took to answer (request sent to response head)",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            &["service", "method_group"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new("in_flight_requests", "Proxied requests being served now")
            .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new("upstream_errors_total", "Upstream failures by kind"),
            &["kind"],
        )
        .expect("valid metric");
        let rejections = IntCounterVec::new(
            Opts::new(
                "rejections_total",
                "Calls refused before the upstream, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let account_requests = IntCounterVec::new(
            Opts::new(
                "account_requests_total",
                "Account API requests by status class",
            ),
            &["status_class"],
        )
        .expect("valid metric");
        let store_queue = IntGauge::new(
            "store_queue_records",
            "Records waiting for the store writer",
        )
        .expect("valid metric");
        let store_bytes = IntGauge::new("store_disk_bytes", "Bytes the store uses on disk")
            .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(total.clone()),
            Box::new(upstream.clone()),
            Box::new(in_flight.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(rejections.clone()),
            Box::new(account_requests.clone()),
            Box::new(store_queue.clone()),
            Box::new(store_bytes.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for kind in UPSTREAM_ERROR_KINDS {
            upstream_errors.with_label_values(&[kind]);
        }
        for reason in COMMON_REJECTIONS {
            rejections.with_label_values(&[reason]);
        }
        let routes = routes
            .iter()
            .map(|r| {
                let (s, g) = (r.service.as_str(), r.method_group.as_str());
                RouteMetrics {
                    by_class: STATUS_CLASSES
                        .map(|class| requests.with_label_values(&[s, g, class])),
                    total_seconds: total.with_label_values(&[s, g]),
                    upstream_seconds: upstream.with_label_values(&[s, g]),
                }
            })
            .collect();
        Metrics {
            registry,
            routes,
            in_flight,
            upstream_errors,
            rejections,
            account_requests,
            store_queue,
            store_bytes,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_route_counters_without_user_labels() {
        let m = Metrics::new(&[]);
        m.upstream_errors.with_label_values(&["timeout"]).inc();
        m.in_flight.set(2);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("tollgate_upstream_errors_total{kind=\"timeout\"} 1"),
            "{text}"
        );
        assert!(text.contains("tollgate_in_flight_requests 2"), "{text}");
        // Kinds not seen yet are there at 0, so an alert on their first increase can fire.
        assert!(
            text.contains("tollgate_upstream_errors_total{kind=\"connect\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tollgate_rejections_total{reason=\"points_per_day\"} 0"),
            "{text}"
        );
    }
}
