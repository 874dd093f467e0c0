//! `POST /v1/embeddings`.

use http::{Method, Request};
use hyper::body::Incoming;

use crate::app::App;
use crate::error::ApiError;
use crate::meter::Reader;
use crate::request::{self, Outcome};
use crate::routes::metering::{self, Worst};
use crate::telemetry::RequestId;
use crate::upstream::Call;
use crate::validate;

/// Body (413, 408) -> authentication (401, 403) -> validation (400) -> limits (429) ->
/// budgets (429 `budget_exceeded`) -> upstream -> the answer, metered as it passes.
pub async fn create(app: &App, request: Request<Incoming>, id: &RequestId) -> Outcome {
    let (parts, identity, body) = match super::authenticate(app, request).await {
        Ok(authenticated) => authenticated,
        Err(refused) => return refused,
    };
    let settings = &app.settings;
    let result = async {
        let product = &identity.product;
        let budgeted = metering::budgeted(app, &identity);
        let options = validate::Options {
            budgeted,
            stream_usage: settings.stream_usage(product),
        };
        let embeddings = validate::embeddings(&body, settings.policy_for(product), options)?;
        // Input only: the output limit of an embeddings request is 0.
        let worst = Worst::of(&embeddings.metering, embeddings.body.len(), 0, "input");
        let plan = metering::plan(app, &identity, &worst, budgeted)?;
        let (grant, metered) = match metering::limit_and_admit(app, &identity, plan).await {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(refused),
        };
        let upstream = app.upstream.of(product).ok_or(ApiError::Internal)?;
        let call = Call {
            method: Method::POST,
            path: request::upstream_path(&parts.uri),
            body: Some(embeddings.body),
            request_id: &id.0,
            client_headers: &parts.headers,
        };
        let forwarded = upstream.forward(call).await;
        let mut outcome = metered.outcome(app, forwarded, Reader::json()).await;
        grant.headers.write(outcome.response.headers_mut());
        Ok(outcome)
    };
    Outcome::of(&identity, result.await)
}
