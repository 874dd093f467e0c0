//! The handlers, one file per API. Each handler is the contract's order of checks for its
//! route, one call per step: the steps live in the rooms that own them ([`crate::auth`],
//! [`crate::validate`], [`crate::limit`], [`crate::upstream`]); what every route shares
//! (body, [`crate::request::Outcome`]) is in [`crate::request`].

pub mod chat;
pub mod embeddings;
pub mod health;
pub mod metering;
pub mod models;
pub mod responses;

use http::Request;
use http::request::Parts;
use hyper::body::Incoming;

use crate::app::App;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::request::{self, Outcome};

/// The first steps of every authenticated route: the body (413, 408), then
/// authentication (401, 403) over the method, path, headers and body.
pub async fn authenticate(app: &App, request: Request<Incoming>) -> Result<(Parts, Identity, bytes::Bytes), Outcome> {
    let (parts, body) = request.into_parts();
    let settings = &app.settings;
    let body = request::read_body(body, &parts.headers, settings.max_body_bytes, settings.client_timeout).await?;
    let identity = app
        .auth
        .verify(&parts.method, parts.uri.path(), &parts.headers, &body)
        .await
        .map_err(|error| Outcome::from(ApiError::from(error)))?;
    Ok((parts, identity, body))
}
