//! `POST /v1/chat/completions`.

use http::{Method, Request};
use hyper::body::Incoming;

use crate::app::App;
use crate::error::ApiError;
use crate::meter::Reader;
use crate::request::Outcome;
use crate::routes::metering::{self, Worst};
use crate::telemetry::RequestId;
use crate::upstream::Call;
use crate::validate;

/// The path after `/v1`, appended to the product's upstream base URL.
const PATH: &str = "/chat/completions";

/// Body (413, 408) -> authentication (401, 403) -> validation (400, against the
/// product's models) -> limits (429) -> budgets (429 `budget_exceeded`) -> the product's
/// upstream (its credential: 502 `upstream_credentials_unavailable`; then the call) ->
/// the answer, metered as it passes. Every answer after the limit decision carries the
/// bucket's headers, and after the budget decision the budget's.
pub async fn completions(app: &App, request: Request<Incoming>, id: &RequestId) -> Outcome {
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
        let chat = validate::chat(&body, settings.policy_for(product), options)?;
        let worst = Worst::of(&chat.metering, chat.body.len(), 0, "messages");
        let plan = metering::plan(app, &identity, &worst, budgeted)?;
        let (grant, metered) = match metering::limit_and_admit(app, &identity, plan).await {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(refused),
        };
        // Authentication only yields products, and every product has an upstream; a miss
        // here is a defect.
        let upstream = app.upstream.of(product).ok_or(ApiError::Internal)?;
        let call = Call {
            method: Method::POST,
            path: PATH,
            body: Some(chat.body),
            request_id: &id.0,
            client_headers: &parts.headers,
        };
        let forwarded = upstream.forward(call).await;
        // The usage chunk the proxy asked for is taken out when the client did not.
        let reader = if chat.stream {
            Reader::chat(options.stream_usage && !chat.metering.client_asked_usage)
        } else {
            Reader::json()
        };
        let mut outcome = metered.outcome(app, forwarded, reader).await;
        grant.headers.write(outcome.response.headers_mut());
        Ok(outcome)
    };
    Outcome::of(&identity, result.await)
}
