//! `POST /v1/responses` and the stored-response routes (`GET`/`DELETE
//! /v1/responses/{id}`, `GET .../input_items`, `POST .../cancel`), each reachable only by
//! the response's owner ([`crate::ownership`]).

use std::sync::{Arc, Mutex};

use http::{Method, Request};
use hyper::body::Incoming;

use crate::app::{App, RESPONSES_PREFIX};
use crate::error::ApiError;
use crate::lock::lock;
use crate::meter::Reader;
use crate::ownership::Owner;
use crate::request::{self, Outcome};
use crate::routes::metering::{self, Worst};
use crate::telemetry::RequestId;
use crate::upstream::Call;
use crate::validate;

/// Body (413, 408) -> authentication (401, 403) -> validation (400) -> ownership of
/// `previous_response_id` (404, 503) -> limits (429) -> budgets (429 `budget_exceeded`)
/// -> upstream -> the answer, metered as it passes; the created response's id is
/// recorded for its owner before the client sees it.
pub async fn create(app: &App, request: Request<Incoming>, id: &RequestId) -> Outcome {
    let (parts, identity, body) = match super::authenticate(app, request).await {
        Ok(authenticated) => authenticated,
        Err(refused) => return refused,
    };
    let owner = Owner::of(&identity);
    let result = async {
        let product = &identity.product;
        let budgeted = metering::budgeted(app, &identity);
        let options = validate::Options {
            budgeted,
            stream_usage: app.settings.stream_usage(product),
        };
        let checked = validate::responses(&body, app.settings.policy_for(product), options)?;
        let previous_tokens = match &checked.previous_response_id {
            Some(previous) => app.ownership.check(&owner, previous).await?,
            None => 0,
        };
        let worst = Worst::of(&checked.metering, checked.body.len(), previous_tokens, "input");
        let plan = metering::plan(app, &identity, &worst, budgeted)?;
        let (grant, mut metered) = match metering::limit_and_admit(app, &identity, plan).await {
            Ok(admitted) => admitted,
            Err(refused) => return Ok(refused),
        };
        // The record of the created response gets its settled token count once the body
        // ends (the reservation's until then): what a request continuing it reserves. The
        // body may end while its id is still being recorded (a short answer): whichever of
        // the two comes second writes the count.
        let settled: Arc<Mutex<Settled>> = Arc::default();
        let (ownership, record_owner, late) = (Arc::clone(&app.ownership), owner.clone(), Arc::clone(&settled));
        metered.on_settled(Box::new(move |tokens| {
            let id = {
                let mut settled = lock(&late);
                settled.tokens = Some(tokens);
                settled.id.clone()
            };
            if let (Some(id), Ok(runtime)) = (id, tokio::runtime::Handle::try_current()) {
                runtime.spawn(async move { ownership.set_tokens(&record_owner, &id, tokens).await });
            }
        }));
        let upstream = app.upstream.of(product).ok_or(ApiError::Internal)?;
        let call = Call {
            method: Method::POST,
            path: request::upstream_path(&parts.uri),
            body: Some(checked.body),
            request_id: &id.0,
            client_headers: &parts.headers,
        };
        let forwarded = upstream.forward(call).await;
        let reader = if checked.stream {
            Reader::responses()
        } else {
            Reader::json()
        };
        let reserved_tokens = metered.reserved_tokens();
        let mut outcome = metered.outcome(app, forwarded, reader).await;
        if outcome.response.status().is_success() {
            let response = std::mem::take(&mut outcome.response);
            let (response, id) = app.ownership.record_created(&owner, response, reserved_tokens).await;
            outcome.response = response;
            if let Some(id) = &id {
                let tokens = {
                    let mut settled = lock(&settled);
                    settled.id = Some(id.clone());
                    settled.tokens
                };
                if let Some(tokens) = tokens {
                    app.ownership.set_tokens(&owner, id, tokens).await;
                }
            }
            outcome.log.response_id = id.map(String::into_boxed_str);
        }
        grant.headers.write(outcome.response.headers_mut());
        Ok(outcome)
    };
    Outcome::of(&identity, result.await)
}

/// A created response's id and settled tokens, as each becomes known.
#[derive(Default)]
struct Settled {
    id: Option<String>,
    tokens: Option<u64>,
}

/// What a stored-response route does upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Get,
    Delete,
    InputItems,
    Cancel,
}

/// Body -> authentication -> ownership (404 for anyone but the owner, without a request
/// upstream; 503 while it cannot be told) -> limits -> [budget] -> upstream. A `2xx`
/// answer to `DELETE` removes the record.
pub async fn stored(app: &App, request: Request<Incoming>, id: &RequestId, action: Stored) -> Outcome {
    let (parts, identity, _body) = match super::authenticate(app, request).await {
        Ok(authenticated) => authenticated,
        Err(refused) => return refused,
    };
    let owner = Owner::of(&identity);
    let response_id = response_id(parts.uri.path());
    let result = async {
        // Ids are what the upstream hands out: anything else names no owned response, and
        // never reaches the upstream's path decoding.
        let response_id = response_id.ok_or(ApiError::ResponseNotFound)?;
        app.ownership.check(&owner, response_id).await?;
        let grant = app.limiter.admit(&identity).await?;
        // These calls cost no tokens: no budget decision.
        let upstream = app.upstream.of(&identity.product).ok_or(ApiError::Internal)?;
        let method = match action {
            Stored::Get | Stored::InputItems => Method::GET,
            Stored::Delete => Method::DELETE,
            Stored::Cancel => Method::POST,
        };
        let call = Call {
            method,
            path: request::upstream_path(&parts.uri),
            // The client's body (signed, if HMAC) is not checked, so it is not forwarded.
            body: None,
            request_id: &id.0,
            client_headers: &parts.headers,
        };
        let mut outcome = match upstream.forward(call).await {
            Err(failure) => failure.into(),
            Ok(forwarded) => {
                if action == Stored::Delete && (200..300).contains(&forwarded.status) {
                    app.ownership.remove(&owner, response_id).await;
                }
                Outcome::from(forwarded)
            }
        };
        grant.headers.write(outcome.response.headers_mut());
        Ok(outcome)
    };
    let mut outcome = Outcome::of(&identity, result.await);
    outcome.log.response_id = response_id.map(Box::from);
    outcome
}

/// The id in `/v1/responses/{id}[/...]` when it is made of `[A-Za-z0-9_-]`, as the
/// upstream's ids are.
fn response_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(RESPONSES_PREFIX)?;
    let id = rest.split('/').next()?;
    let valid =
        !id.is_empty() && id.len() <= 256 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    valid.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ids_are_plain_segments() {
        assert_eq!(response_id("/v1/responses/resp_1"), Some("resp_1"));
        assert_eq!(response_id("/v1/responses/resp-1/input_items"), Some("resp-1"));
        assert_eq!(response_id("/v1/responses/resp%5F1"), None);
        assert_eq!(response_id("/v1/responses/a.b"), None);
    }
}
