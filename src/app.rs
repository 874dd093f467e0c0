//! [`AppState`] and the router: the one place where routes and layers are composed.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use bytes::Bytes;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::Authenticator;
use crate::error::ApiError;
use crate::limit::Limiter;
use crate::proxy;
use crate::settings::Settings;
use crate::store::Store;
use crate::telemetry;
use crate::upstream::Upstream;

/// Everything a request needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub auth: Arc<Authenticator>,
    pub limiter: Arc<Limiter>,
    pub upstream: Arc<Upstream>,
    pub models: Arc<Models>,
}

impl AppState {
    /// Builds the state; Redis, when configured, connects in the background.
    pub fn new(settings: Settings) -> Self {
        let store = settings.redis.as_ref().map(|redis| Arc::new(Store::start(redis)));
        Self {
            auth: Arc::new(Authenticator::new(&settings, store.clone())),
            limiter: Arc::new(Limiter::new(&settings.limits, store)),
            upstream: Arc::new(Upstream::new(&settings.upstream)),
            models: Arc::new(Models::new(&settings.policy.allowed_models)),
            settings: Arc::new(settings),
        }
    }
}

/// `GET /v1/models` answers, serialised once at startup.
pub struct Models {
    pub list: Bytes,
    each: HashMap<String, Bytes>,
}

impl Models {
    fn new(names: &[String]) -> Self {
        let model = |id: &str| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "openai"});
        let list = serde_json::json!({"object": "list", "data": names.iter().map(|n| model(n)).collect::<Vec<_>>()});
        let each = names
            .iter()
            .map(|n| (n.clone(), Bytes::from(model(n).to_string())))
            .collect();
        Self {
            list: Bytes::from(list.to_string()),
            each,
        }
    }

    pub fn one(&self, name: &str) -> Option<Bytes> {
        self.each.get(name).cloned()
    }
}

/// The service's routes and layers.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(proxy::health).fallback(proxy::get_only))
        .route("/health", get(proxy::health).fallback(proxy::get_only))
        .route(
            "/v1/chat/completions",
            post(proxy::chat_completions).fallback(proxy::post_only),
        )
        .route("/v1/models", get(proxy::list_models).fallback(proxy::get_only))
        .route("/v1/models/{*model}", get(proxy::get_model).fallback(proxy::get_only))
        .fallback(proxy::not_found)
        .with_state(state)
        // Layers, innermost first (each `.layer` wraps everything above it):
        // A panic is a defect: answer 500 in the envelope instead of dropping the
        // connection. Inside the log layer, so the 500 is logged with its request id.
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal)
        }))
        // Outermost: the request id exists before anything can fail, every response
        // carries it, and the log line sees the final status.
        .layer(axum::middleware::from_fn(telemetry::middleware))
}
