//! `POST /v1/chat/completions`.

use http::{Method, Request};
use hyper::body::Incoming;

use crate::app::App;
use crate::error::ApiError;
use crate::request::{self, Outcome};
use crate::telemetry::RequestId;
use crate::upstream::Call;
use crate::validate;

/// The path after `/v1`, appended to the product's upstream base URL.
const PATH: &str = "/chat/completions";

/// Body (413, 408) -> authentication (401, 403) -> validation (400, against the
/// product's models) -> limits (429) -> the product's upstream (its credential: 502
/// `upstream_credentials_unavailable`; then the call). Every answer after the limit decision carries the bucket's headers.
pub async fn completions(app: &App, request: Request<Incoming>, id: &RequestId) -> Outcome {
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
        let chat = validate::chat(&body, settings.policy_for(&identity.product), options)?;
        let grant = app.limiter.admit(&identity).await?;
        // Authentication only yields products, and every product has an upstream; a miss
        // here is a defect.
        let upstream = app.upstream.of(&identity.product).ok_or(ApiError::Internal)?;
        let call = Call {
            method: Method::POST,
            path: PATH,
            body: Some(chat.body),
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
