//! `GET /v1/models` and `GET /v1/models/{model}`: the models the caller's product may
//! use, in OpenAI's formats, serialised once at startup ([`crate::app::Models`]).

use std::borrow::Cow;

use http::Request;
use http::request::Parts;
use hyper::body::Incoming;

use crate::app::{App, MODEL_PREFIX};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::request::Outcome;

/// `GET /v1/models`: the allowed models in OpenAI's list format.
pub async fn list(app: &App, request: Request<Incoming>) -> Outcome {
    let (parts, _) = request.into_parts();
    match authenticate(app, &parts).await {
        Ok(identity) => {
            let list = app.models.of(&identity.product).list.clone();
            Outcome::of(&identity, Ok(Outcome::json(list)))
        }
        Err(refused) => refused,
    }
}

/// `GET /v1/models/{model}`: one allowed model, or 404 `model_not_found`.
pub async fn one(app: &App, request: Request<Incoming>) -> Outcome {
    let (parts, _) = request.into_parts();
    match authenticate(app, &parts).await {
        Ok(identity) => {
            let name = parts.uri.path().get(MODEL_PREFIX.len()..).unwrap_or_default();
            let model = app.models.of(&identity.product).one(&percent_decode(name));
            Outcome::of(&identity, model.map(Outcome::json).ok_or(ApiError::ModelNotFound))
        }
        Err(refused) => refused,
    }
}

async fn authenticate(app: &App, request: &Parts) -> Result<Identity, Outcome> {
    app.auth
        .verify(&request.method, request.uri.path(), &request.headers, &[])
        .await
        .map_err(|error| ApiError::from(error).into())
}

/// Model ids in a path may be percent-encoded (`ft%3Agpt-4o`); decode the few bytes
/// that matter without allocating for the common case.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_digit(bytes[i + 1]), hex_digit(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_of_model_ids() {
        assert_eq!(percent_decode("gpt-4o"), "gpt-4o");
        assert_eq!(percent_decode("ft%3Agpt-4o"), "ft:gpt-4o");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%é"), "%é");
    }
}
