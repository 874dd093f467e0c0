//! Prometheus metrics: the counters and histograms, the calls that update them, and the
//! `GET /metrics` listener on its own port (`API_KEY_SERVER_METRICS_PORT`).
//!
//! The metrics are process-wide (one registry per process, like the process's own
//! counters): every instance is scraped on its own, so there is nothing to share and no
//! reason to thread a handle through [`crate::app::App`]. The update functions are
//! cheap enough for the request path: label values are `&'static str` or integers, so a
//! call is one read-locked map lookup and an atomic add, and allocates only the first
//! time a label set is seen.
//!
//! Label cardinality is bounded by construction: routes are the templates of
//! [`crate::app::Route`] (never a raw path, and `&'static str` by type), statuses and error codes come from the contract's tables, and the limiter
//! labels and upstream failure causes are fixed words ([`crate::upstream::Cause`]). The usage
//! counters take a product and a model: both are bounded by the settings (products are
//! configured, and a model is counted only once validation allowed it). Nothing here may
//! ever take a user, key or path.
//!
//! The listener serves only `GET /metrics`. On Cloud Run the port is reachable only
//! inside the instance, by the Managed Prometheus sidecar (see `deploy/`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{LazyLock, RwLock};

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The route label of a request that matched no route (404s of unknown paths).
pub const UNMATCHED: &str = "unmatched";

/// Upper bounds (seconds) of the upstream latency buckets: from a fast non-streamed answer
/// to the longest wait for headers the default `UPSTREAM_TIMEOUT_SECONDS` allows.
const LATENCY_BUCKETS: [f64; 14] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 90.0, 120.0,
];

/// The values of the limiter decision labels (see [`limiter_decision`]).
const LIMITER_OUTCOMES: [&str; 3] = ["admitted", "rate_limited", "quota_exceeded"];
const LIMITER_BACKENDS: [&str; 2] = ["redis", "memory"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
    /// The contract's error code; empty for a success.
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    route: &'static str,
    /// A word of [`crate::upstream::Cause::as_str`].
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    outcome: &'static str,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLabels {
    /// A configured product and a model it may call: both bounded by the settings.
    product: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    product: String,
    model: String,
    /// `input` (cached included), `cached` or `output`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    /// `admitted` or `refused`.
    outcome: &'static str,
    /// `redis` or `memory`.
    store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutageLabels {
    /// `replayed` (added to Redis once it was back) or `lost` (held by an instance that
    /// stopped first).
    fate: &'static str,
}

struct Metrics {
    registry: Registry,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<UsageLabels, Counter>,
    budget_decisions: Family<BudgetLabels, Counter>,
    budget_expired: Counter,
    budget_outage: Family<OutageLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Histogram,
    upstream_failures: Family<FailureLabels, Counter>,
    limiter_decisions: Family<DecisionLabels, Counter>,
    redis_errors: Counter,
    redis_configured: Gauge,
    redis_fallback: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("api_key_server");
    let requests = Family::<RequestLabels, Counter>::default();
    registry.register(
        "requests",
        "Requests answered, by route template, status and error code",
        requests.clone(),
    );
    let upstream_latency = Histogram::new(LATENCY_BUCKETS);
    registry.register(
        "upstream_latency_seconds",
        "Time from sending a request upstream to the upstream's response headers",
        upstream_latency.clone(),
    );
    let upstream_failures = Family::<FailureLabels, Counter>::default();
    registry.register(
        "upstream_failures",
        "Requests the upstream gave no usable response or cut short, by route template and cause \
         (connect_refused, connect_failed, dns, tls, reset, closed, protocol, timeout, idle_timeout, pool_wait, other)",
        upstream_failures.clone(),
    );
    let limiter_decisions = Family::<DecisionLabels, Counter>::default();
    // Every combination exists from the start, at 0: an empty family is not exposed at
    // all, and `rate()` needs the series before its first increment.
    for outcome in LIMITER_OUTCOMES {
        for backend in LIMITER_BACKENDS {
            let _ = limiter_decisions.get_or_create(&DecisionLabels { outcome, backend });
        }
    }
    registry.register(
        "limiter_decisions",
        "Rate limiter decisions, by outcome (admitted, rate_limited, quota_exceeded) and backend (redis, memory)",
        limiter_decisions.clone(),
    );
    let redis_errors = Counter::default();
    registry.register(
        "redis_errors",
        "Redis operations that failed or timed out (the decision was then taken in memory)",
        redis_errors.clone(),
    );
    let redis_configured = Gauge::default();
    registry.register(
        "redis_configured",
        "1 when REDIS_URL is set (limits and nonces shared through Redis), else 0",
        redis_configured.clone(),
    );
    let redis_fallback = Gauge::default();
    registry.register(
        "redis_fallback_active",
        "1 while Redis is unavailable and limits and nonces are decided in memory, else 0",
        redis_fallback.clone(),
    );
    let tokens = Family::<TokenLabels, Counter>::default();
    registry.register(
        "tokens",
        "Tokens of metered responses as the upstream reported them (or as reserved, when it did not), by product, model and kind (input, cached, output)",
        tokens.clone(),
    );
    let cost = Family::<UsageLabels, Counter>::default();
    registry.register(
        "cost_nanousd",
        "Cost of metered responses in 1e-9 USD, by product and model (models with a price only)",
        cost.clone(),
    );
    let budget_decisions = Family::<BudgetLabels, Counter>::default();
    for outcome in ["admitted", "refused"] {
        for store in LIMITER_BACKENDS {
            let _ = budget_decisions.get_or_create(&BudgetLabels { outcome, store });
        }
    }
    registry.register(
        "budget_decisions",
        "Budget admissions, by outcome (admitted, refused) and store (redis, memory)",
        budget_decisions.clone(),
    );
    let budget_expired = Counter::default();
    registry.register(
        "budget_expired_reservations",
        "Reservations charged in full because they were not settled within BUDGET_RESERVATION_SECONDS",
        budget_expired.clone(),
    );
    let budget_outage = Family::<OutageLabels, Counter>::default();
    for fate in ["replayed", "lost"] {
        let _ = budget_outage.get_or_create(&OutageLabels { fate });
    }
    registry.register(
        "budget_outage_spend_nanousd",
        "Spend admitted while Redis was unavailable, in 1e-9 USD: replayed into Redis, or lost with an instance that stopped first",
        budget_outage.clone(),
    );
    Metrics {
        registry,
        tokens,
        cost,
        budget_decisions,
        budget_expired,
        budget_outage,
        requests,
        upstream_latency,
        upstream_failures,
        limiter_decisions,
        redis_errors,
        redis_configured,
        redis_fallback,
    }
});

/// Counts one answered request. `route` is the matched route template
/// ([`crate::app::Route::template`], e.g. `/v1/models/{*model}`) or [`UNMATCHED`]; `code` is the error code
/// of the response, `None` for a success. Called from the request's log line.
pub fn request(route: &'static str, status: u16, code: Option<&'static str>) {
    let labels = RequestLabels {
        route,
        status,
        code: code.unwrap_or(""),
    };
    METRICS.requests.get_or_create(&labels).inc();
}

/// Records the time until the upstream's response headers, in seconds.
pub fn upstream_latency(seconds: f64) {
    METRICS.upstream_latency.observe(seconds);
}

/// Counts one upstream failure of a request on `route` (a template, as for
/// [`request`]); `cause` is a word of [`crate::upstream::Cause::as_str`]. Called from the
/// request's log line, with the same cause.
pub fn upstream_failure(route: &'static str, cause: &'static str) {
    METRICS
        .upstream_failures
        .get_or_create(&FailureLabels { route, cause })
        .inc();
}

/// Counts one limiter decision. `outcome`: `"admitted"`, `"rate_limited"` or
/// `"quota_exceeded"`; `backend`: `"redis"` or `"memory"` (no Redis configured, or the
/// fallback).
pub fn limiter_decision(outcome: &'static str, backend: &'static str) {
    METRICS
        .limiter_decisions
        .get_or_create(&DecisionLabels { outcome, backend })
        .inc();
}

/// One (product, model)'s usage counters: input, cached and output tokens, and cost.
#[derive(Clone)]
struct UsageCounters([Counter; 4]);

/// The usage counters by product, then model: looked up by `&str`, so that counting a
/// request allocates nothing once its (product, model) was seen.
static USAGE: LazyLock<RwLock<HashMap<String, HashMap<String, UsageCounters>>>> = LazyLock::new(RwLock::default);

fn usage_counters(product: &str, model: &str) -> UsageCounters {
    if let Some(counters) = read(&USAGE).get(product).and_then(|models| models.get(model)) {
        return counters.clone();
    }
    let token = |kind| {
        METRICS
            .tokens
            .get_or_create(&TokenLabels {
                product: product.to_owned(),
                model: model.to_owned(),
                kind,
            })
            .clone()
    };
    let cost = METRICS
        .cost
        .get_or_create(&UsageLabels {
            product: product.to_owned(),
            model: model.to_owned(),
        })
        .clone();
    let counters = UsageCounters([token("input"), token("cached"), token("output"), cost]);
    write(&USAGE)
        .entry(product.to_owned())
        .or_default()
        .insert(model.to_owned(), counters.clone());
    counters
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a metered response's tokens and, for a priced model, its cost in 1e-9 USD.
/// `product` and `model` are bounded by the settings (validation allowed the model).
pub fn usage(product: &str, model: &str, input: u64, cached: u64, output: u64, cost_nanos: Option<u64>) {
    let UsageCounters([input_counter, cached_counter, output_counter, cost]) = usage_counters(product, model);
    input_counter.inc_by(input);
    cached_counter.inc_by(cached);
    output_counter.inc_by(output);
    if let Some(nanos) = cost_nanos {
        cost.inc_by(nanos);
    }
}

/// Counts one budget admission decision.
pub fn budget_decision(admitted: bool, store: &'static str) {
    let outcome = if admitted { "admitted" } else { "refused" };
    METRICS
        .budget_decisions
        .get_or_create(&BudgetLabels { outcome, store })
        .inc();
}

/// Counts reservations charged in full on expiry.
pub fn budget_expired(count: u64) {
    METRICS.budget_expired.inc_by(count);
}

/// Counts outage spend (1e-9 USD) `replayed` into Redis or `lost`.
pub fn budget_outage_spend(fate: &'static str, nanos: u64) {
    METRICS
        .budget_outage
        .get_or_create(&OutageLabels { fate })
        .inc_by(nanos);
}

/// Counts one Redis operation that failed or timed out.
pub fn redis_error() {
    METRICS.redis_errors.inc();
}

/// Marks whether the in-memory fallback is deciding instead of Redis.
pub fn set_redis_fallback(active: bool) {
    METRICS.redis_fallback.set(i64::from(active));
}

/// Marks whether Redis is configured at all (set once at startup).
pub fn set_redis_configured(configured: bool) {
    METRICS.redis_configured.set(i64::from(configured));
}

/// The current metrics in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    let mut text = String::with_capacity(4096);
    // Writing into a String cannot fail; an encoder error would be a defect in a metric.
    if prometheus_client::encoding::prometheus_text::encode(&mut text, &METRICS.registry).is_err() {
        tracing::error!("cannot encode the metrics");
    }
    text
}

/// The `GET /metrics` listener started by [`serve`].
pub struct MetricsServer {
    /// The address bound (useful with port 0).
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Stops the listener (scrapes need no drain).
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `GET /metrics` there until [`MetricsServer::stop`].
pub async fn serve(addr: SocketAddr) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(scrape));
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics listener failed");
        }
    });
    Ok(MetricsServer { addr, task })
}

async fn scrape() -> Response {
    let mut response = (StatusCode::OK, render()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_holds_every_metric_family() {
        request("/v1/unit-test", 200, None);
        limiter_decision("admitted", "memory");
        upstream_failure("/v1/unit-test", "tls");
        let text = render();
        for name in [
            "api_key_server_requests_total",
            "api_key_server_upstream_latency_seconds",
            "api_key_server_upstream_failures_total",
            "api_key_server_limiter_decisions_total",
            "api_key_server_redis_errors_total",
            "api_key_server_redis_configured",
            "api_key_server_redis_fallback_active",
        ] {
            assert!(text.contains(&format!("# TYPE {name}")), "{name} in\n{text}");
        }
        assert!(
            text.contains(r#"api_key_server_requests_total{route="/v1/unit-test",status="200",code=""}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"api_key_server_upstream_failures_total{route="/v1/unit-test",cause="tls"} 1"#),
            "{text}"
        );
    }
}
