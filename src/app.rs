//! [`App`] and the route table: the request's way through the service, from route to
//! handler ([`crate::routes`]) to log line.
//!
//! The routes are few and fixed, so they are matched by hand ([`Route::of`]) rather than
//! by a router: no per-request service clone, boxed middleware or extension map on the
//! hot path. [`handle`] is the one entry point the listener calls.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::Method;
use hyper::body::Incoming;

use crate::auth::Authenticator;
use crate::budget::admission::Budgets;
use crate::error::ApiError;
use crate::limit::Limiter;
use crate::metrics;
use crate::ownership::Ownership;
use crate::request::Outcome;
use crate::routes;
use crate::routes::responses::Stored;
use crate::settings::Settings;
use crate::store::Store;
use crate::telemetry::{LogLine, LoggedBody, RequestId};
use crate::upstream::Upstreams;

/// Everything a request needs; one per process, shared by reference.
pub struct App {
    pub settings: Settings,
    pub auth: Authenticator,
    pub limiter: Limiter,
    pub upstream: Upstreams,
    pub models: Models,
    pub ownership: Arc<Ownership>,
    pub budgets: Budgets,
}

impl App {
    /// Builds the state; Redis, when configured, connects in the background.
    pub fn new(settings: Settings) -> Self {
        let store = settings.redis.as_ref().map(|redis| Arc::new(Store::start(redis)));
        Self {
            auth: Authenticator::new(&settings, store.clone()),
            limiter: Limiter::with_clock(&settings.limits, store.clone(), settings.clock.clone())
                .with_day_zone(settings.day_zone.clone()),
            budgets: Budgets::new(
                &settings.budgets,
                settings.day_zone.clone(),
                settings.clock.clone(),
                store.clone(),
            ),
            ownership: Arc::new(Ownership::new(store)),
            upstream: Upstreams::new(&settings),
            models: Models::new(&settings),
            settings,
        }
    }
}

/// `GET /v1/models` answers per product, serialised once at startup.
pub struct Models {
    /// For the products that use the default models.
    default: ModelList,
    /// For the products whose upstream names its own `models` or `embedding_models`.
    products: HashMap<Arc<str>, ModelList>,
}

impl Models {
    fn new(settings: &Settings) -> Self {
        let chat = &settings.policy.allowed_models;
        let embedding = &settings.policy.embedding_models;
        let products = settings
            .product_upstreams
            .iter()
            .filter(|(_, u)| u.models.is_some() || u.embedding_models.is_some())
            .map(|(product, u)| {
                let chat = u.models.as_deref().unwrap_or(chat);
                let embedding = u.embedding_models.as_deref().unwrap_or(embedding);
                (Arc::clone(product), ModelList::new(chat, embedding))
            })
            .collect();
        Self {
            default: ModelList::new(chat, embedding),
            products,
        }
    }

    /// The models `product` may use.
    pub fn of(&self, product: &str) -> &ModelList {
        self.products.get(product).unwrap_or(&self.default)
    }
}

/// One product's models: the list, and each model, in OpenAI's formats.
pub struct ModelList {
    pub list: Bytes,
    each: HashMap<String, Bytes>,
}

impl ModelList {
    /// Chat models first, then embedding models, each name once.
    fn new(chat: &[String], embedding: &[String]) -> Self {
        let model = |id: &str| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "openai"});
        let mut names: Vec<&String> = Vec::with_capacity(chat.len() + embedding.len());
        for name in chat.iter().chain(embedding) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let list = serde_json::json!({"object": "list", "data": names.iter().map(|n| model(n)).collect::<Vec<_>>()});
        let each = names
            .iter()
            .map(|n| ((*n).clone(), Bytes::from(model(n).to_string())))
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

/// The contract's routes. Paths match exactly (no trailing-slash or case folding); the
/// query string plays no part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Health,
    ChatCompletions,
    Models,
    /// `/v1/models/{model}`: the rest of the path, one character or more, is the model id.
    Model,
    Responses,
    /// `/v1/responses/{id}`: one path segment.
    Response,
    ResponseInputItems,
    ResponseCancel,
    Embeddings,
    Unknown,
}

/// The prefix of [`Route::Model`]'s paths.
pub const MODEL_PREFIX: &str = "/v1/models/";
/// The prefix of the stored-response routes' paths.
pub const RESPONSES_PREFIX: &str = "/v1/responses/";

impl Route {
    pub fn of(path: &str) -> Self {
        match path {
            "/healthz" => Self::Healthz,
            "/health" => Self::Health,
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/models" => Self::Models,
            "/v1/responses" => Self::Responses,
            "/v1/embeddings" => Self::Embeddings,
            _ if path.len() > MODEL_PREFIX.len() && path.starts_with(MODEL_PREFIX) => Self::Model,
            _ => path.strip_prefix(RESPONSES_PREFIX).map_or(Self::Unknown, Self::stored),
        }
    }

    /// `{id}`, `{id}/input_items` or `{id}/cancel`.
    fn stored(rest: &str) -> Self {
        match rest.split_once('/') {
            None if !rest.is_empty() => Self::Response,
            Some((id, "input_items")) if !id.is_empty() => Self::ResponseInputItems,
            Some((id, "cancel")) if !id.is_empty() => Self::ResponseCancel,
            _ => Self::Unknown,
        }
    }

    /// The route's template: the metrics label and the log line's route.
    pub fn template(self) -> &'static str {
        match self {
            Self::Healthz => "/healthz",
            Self::Health => "/health",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Models => "/v1/models",
            Self::Model => "/v1/models/{*model}",
            Self::Responses => "/v1/responses",
            Self::Response => "/v1/responses/{id}",
            Self::ResponseInputItems => "/v1/responses/{id}/input_items",
            Self::ResponseCancel => "/v1/responses/{id}/cancel",
            Self::Embeddings => "/v1/embeddings",
            Self::Unknown => metrics::UNMATCHED,
        }
    }
}

/// One request, start to end: route, method check, handler, request id and log line.
///
/// hyper's server boxes this future, moving it by value, for every request: its size is a
/// cost per request. Rare paths that hold large futures (a new upstream connection, Redis
/// calls) box them, so that this one stays a few KiB.
pub async fn handle(app: Arc<App>, request: http::Request<Incoming>) -> http::Response<LoggedBody> {
    let route = Route::of(request.uri().path());
    let head = request.method() == Method::HEAD;
    let line = LogLine::begin(&request, route.template());
    let app = &*app;
    // A panic is a defect: answer 500 `internal_error` in the envelope instead of dropping
    // the connection, and still log the request.
    let outcome = AssertUnwindSafe(dispatch(app, route, request, line.id()))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| ApiError::Internal.into());
    line.finish(if head { outcome.without_body() } else { outcome })
}

/// The route table: (route, method) -> handler.
async fn dispatch(app: &App, route: Route, request: http::Request<Incoming>, id: &RequestId) -> Outcome {
    let method = request.method();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    match route {
        Route::Unknown => ApiError::NotFound.into(),
        Route::ChatCompletions if post => routes::chat::completions(app, request, id).await,
        Route::Responses if post => routes::responses::create(app, request, id).await,
        Route::Embeddings if post => routes::embeddings::create(app, request, id).await,
        Route::ResponseCancel if post => routes::responses::stored(app, request, id, Stored::Cancel).await,
        Route::ChatCompletions | Route::Responses | Route::Embeddings | Route::ResponseCancel => {
            ApiError::MethodNotAllowed { allow: "POST" }.into()
        }
        Route::Response if get => routes::responses::stored(app, request, id, Stored::Get).await,
        Route::Response if method == Method::DELETE => {
            routes::responses::stored(app, request, id, Stored::Delete).await
        }
        Route::Response => ApiError::MethodNotAllowed {
            allow: "GET, HEAD, DELETE",
        }
        .into(),
        _ if !get => ApiError::MethodNotAllowed { allow: "GET, HEAD" }.into(),
        Route::Healthz | Route::Health => routes::health::check(),
        Route::Models => routes::models::list(app, request).await,
        Route::Model => routes::models::one(app, request).await,
        Route::ResponseInputItems => routes::responses::stored(app, request, id, Stored::InputItems).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_whole_paths_only() {
        assert_eq!(Route::of("/healthz"), Route::Healthz);
        assert_eq!(Route::of("/health"), Route::Health);
        assert_eq!(Route::of("/v1/chat/completions"), Route::ChatCompletions);
        assert_eq!(Route::of("/v1/models"), Route::Models);
        assert_eq!(Route::of("/v1/models/gpt-4o"), Route::Model);
        assert_eq!(Route::of("/v1/models/a/b"), Route::Model);
        assert_eq!(Route::of("/v1/responses"), Route::Responses);
        assert_eq!(Route::of("/v1/responses/r"), Route::Response);
        assert_eq!(Route::of("/v1/responses/r/input_items"), Route::ResponseInputItems);
        assert_eq!(Route::of("/v1/responses/r/cancel"), Route::ResponseCancel);
        assert_eq!(Route::of("/v1/embeddings"), Route::Embeddings);
        for unknown in [
            "/",
            "",
            "/healthz/",
            "//healthz",
            "/V1/models",
            "/v1/models/",
            "/v1/chat/completions/x",
            "/v1/responses/",
            "/v1/responses//cancel",
            "/v1/responses/r/x",
            "/v1/responses/r/cancel/x",
        ] {
            assert_eq!(Route::of(unknown), Route::Unknown, "{unknown}");
        }
    }
}
