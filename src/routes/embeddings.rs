//! `POST /v1/embeddings`.

use http::{Method, Request};
use hyper::body::Incoming;

use crate::app::App;
use crate::error::ApiError;
use crate::request::{self, Outcome};
use crate::telemetry::RequestId;
use crate::upstream::Call;
use crate::validate;

/// Body (413, 408) -> authentication (401, 403) -> validation (400) -> limits (429) ->
/// [budget] -> upstream.
pub async fn create(app: &App, request: Request<Incoming>, id: &RequestId) -> Outcome {
    let (parts, body) = request.into_parts();
    let settings = &app.settings;
    let body = match request::read_body(body, &parts.headers, settings.max_body_bytes, settings.client_timeout).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let identity = match app
        .auth
        .verify(&Method::POST, parts.uri.path(), &parts.headers, &body)
        .await
    {
        Ok(identity) => identity,
        Err(error) => return ApiError::from(error).into(),
    };
    let result = async {
        let options = validate::Options {
            budgeted: false,
            stream_usage: settings.stream_usage(&identity.product),
        };
        let body = validate::embeddings(&body, settings.policy_for(&identity.product), options)?.body;
        let grant = app.limiter.admit(&identity).await?;
        // Budget seam: reserve the input here (contract "Budgets"), settle from `usage`.
        let upstream = app.upstream.of(&identity.product).ok_or(ApiError::Internal)?;
        let call = Call {
            method: Method::POST,
            path: request::upstream_path(&parts.uri),
            body: Some(body),
            request_id: &id.0,
            client_headers: &parts.headers,
        };
        let forwarded = upstream.forward(call).await;
        let mut outcome = forwarded.map_or_else(Outcome::from, Outcome::from);
        grant.headers.write(outcome.response.headers_mut());
        Ok(outcome)
    };
    Outcome::of(&identity, result.await)
}
