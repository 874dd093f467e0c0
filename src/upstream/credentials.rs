//! The credential each product's upstream gets: a stored key (`bearer`, `api-key`), or the
//! instance's Google access token (`google`), fetched from the metadata server.
//!
//! The Google token is cached and refreshed before it expires, by one fetch at a time that
//! runs in its own task: requests go on with the valid token meanwhile, and only a request
//! that finds no valid token waits, for at most [`TOKEN_WAIT`], for the fetch in flight.
//! A credential is never logged and never printed: `Debug` names only its kind, and every
//! header value is marked sensitive. The settings allow `google` only for upstreams under
//! `*.googleapis.com` or on loopback, so the token goes nowhere else.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::UpstreamError;
use super::pool::Pool;
use crate::lock::lock;
use crate::settings::MetadataHost;

/// Longest wait for a Google token: after it, 502 `upstream_credentials_unavailable`.
pub(crate) const TOKEN_WAIT: Duration = Duration::from_secs(5);
/// A token is refreshed once less than the shorter of this and a quarter of its lifetime
/// is left.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// The metadata server's answer is a small JSON object; anything larger is not one.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const METADATA_FLAVOR: HeaderName = HeaderName::from_static("metadata-flavor");
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// What one product's upstream is sent to prove who we are.
pub(crate) enum Credential {
    /// `Authorization: Bearer <key>`.
    Bearer(HeaderValue),
    /// `api-key: <key>`, and no `Authorization` (Azure OpenAI).
    ApiKey(HeaderValue),
    /// `Authorization: Bearer <token>` of the instance's service account.
    Google(Arc<GoogleTokens>),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bearer(_) => "Credential::Bearer(***)",
            Self::ApiKey(_) => "Credential::ApiKey(***)",
            Self::Google(_) => "Credential::Google(***)",
        })
    }
}

impl Credential {
    /// A stored key sent as `Authorization: Bearer <key>`.
    pub(crate) fn bearer(key: &HeaderValue) -> Self {
        let mut value = Vec::with_capacity(7 + key.len());
        value.extend_from_slice(b"Bearer ");
        value.extend_from_slice(key.as_bytes());
        let mut value =
            HeaderValue::from_bytes(&value).expect("the settings checked that `Bearer <key>` is a header value");
        value.set_sensitive(true);
        Self::Bearer(value)
    }

    /// A stored key sent as `api-key: <key>`.
    pub(crate) fn api_key(key: &HeaderValue) -> Self {
        let mut value = key.clone();
        value.set_sensitive(true);
        Self::ApiKey(value)
    }

    /// The header to send, waiting for a Google token when none is valid.
    pub(crate) async fn header(&self) -> Result<(HeaderName, HeaderValue), UpstreamError> {
        match self {
            Self::Bearer(value) => Ok((header::AUTHORIZATION, value.clone())),
            Self::ApiKey(value) => Ok((API_KEY, value.clone())),
            Self::Google(tokens) => Ok((header::AUTHORIZATION, tokens.bearer().await?)),
        }
    }

    /// The upstream refused `sent` (401 or 403): a cached Google token is dropped, so that
    /// the next request fetches a new one.
    pub(crate) fn refused(&self, sent: &HeaderValue) {
        if let Self::Google(tokens) = self {
            tokens.drop_token(sent);
        }
    }
}

/// The instance's Google access tokens: one cache for every `google` product (they all
/// act as the same service account).
pub(crate) struct GoogleTokens {
    /// Plain HTTP to the metadata server, over the same pooled HTTP/1.1 connections as
    /// the upstreams.
    pool: Arc<Pool>,
    host: HeaderValue,
    state: Mutex<TokenState>,
    /// The result of the last fetch that ended (`None`: it failed); waiters subscribe
    /// before they look at the state, so no result is missed.
    fetched: watch::Sender<Option<Token>>,
}

impl fmt::Debug for GoogleTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GoogleTokens")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct TokenState {
    token: Option<Token>,
    /// A fetch is in flight: no other starts.
    fetching: bool,
}

#[derive(Clone)]
struct Token {
    /// `Bearer <access token>`, marked sensitive.
    header: HeaderValue,
    expires: Instant,
    refresh: Instant,
}

/// The metadata server's token answer (`token_type` is always `Bearer`).
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

impl GoogleTokens {
    pub(crate) fn new(metadata: &MetadataHost) -> Arc<Self> {
        let authority = &metadata.0;
        let destination = format!("http://{authority}/")
            .parse()
            .expect("a valid authority makes a valid http URL");
        let host = HeaderValue::from_str(authority.as_str()).expect("a valid authority is a valid header value");
        Arc::new(Self {
            pool: Pool::new(destination),
            host,
            state: Mutex::new(TokenState::default()),
            fetched: watch::Sender::new(None),
        })
    }

    /// `Bearer <token>`: the cached token while it is valid (starting a refresh in the
    /// background once one is due), else the result of the fetch in flight, waited for up
    /// to [`TOKEN_WAIT`].
    async fn bearer(self: &Arc<Self>) -> Result<HeaderValue, UpstreamError> {
        let mut fetched = self.fetched.subscribe();
        {
            let now = Instant::now();
            let mut state = lock(&self.state);
            let valid = state
                .token
                .as_ref()
                .filter(|t| now < t.expires)
                .map(|t| (t.header.clone(), now >= t.refresh));
            let start = !state.fetching && valid.as_ref().is_none_or(|(_, due)| *due);
            if start {
                state.fetching = true;
            }
            drop(state);
            if start {
                tokio::spawn(Arc::clone(self).refresh());
            }
            if let Some((header, _)) = valid {
                return Ok(header);
            }
        }
        match tokio::time::timeout(TOKEN_WAIT, fetched.changed()).await {
            Ok(Ok(())) => fetched
                .borrow_and_update()
                .as_ref()
                .map(|t| t.header.clone())
                .ok_or(UpstreamError::CredentialsUnavailable),
            _ => Err(UpstreamError::CredentialsUnavailable),
        }
    }

    /// One fetch, in its own task so that no request's cancellation ends it. A failed
    /// fetch keeps the old token, which may still be valid for a while.
    async fn refresh(self: Arc<Self>) {
        let token = tokio::time::timeout(TOKEN_WAIT, self.fetch()).await.ok().flatten();
        {
            let mut state = lock(&self.state);
            state.fetching = false;
            if let Some(token) = &token {
                state.token = Some(token.clone());
            }
        }
        if token.is_none() {
            // Which fetch failed, never why in detail: the answer may hold the token.
            tracing::warn!("could not get an access token from the metadata server");
        }
        self.fetched.send_replace(token);
    }

    async fn fetch(&self) -> Option<Token> {
        let request = Request::get(TOKEN_PATH)
            .header(header::HOST, self.host.clone())
            .header(METADATA_FLAVOR, HeaderValue::from_static("Google"))
            .body(Full::new(Bytes::new()))
            .ok()?;
        let asked = Instant::now();
        // A fetch no request waits for any longer ends too, instead of holding a connection.
        let response = self.pool.send(request, TOKEN_WAIT).await.ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let body = Limited::new(response.into_body(), MAX_TOKEN_RESPONSE_BYTES)
            .collect()
            .await
            .ok()?
            .to_bytes();
        let answer: TokenAnswer = serde_json::from_slice(&body).ok()?;
        let mut header = HeaderValue::from_str(&format!("Bearer {}", answer.access_token)).ok()?;
        header.set_sensitive(true);
        // Timed from the question, so that the token is never thought to live longer
        // than it does.
        let lifetime = Duration::from_secs(answer.expires_in);
        let margin = REFRESH_MARGIN.min(lifetime / 4);
        Some(Token {
            header,
            expires: asked + lifetime,
            refresh: asked + lifetime.saturating_sub(margin),
        })
    }

    fn drop_token(&self, sent: &HeaderValue) {
        let mut state = lock(&self.state);
        if state.token.as_ref().is_some_and(|t| t.header == *sent) {
            state.token = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_key() {
        let key = HeaderValue::from_static("sk-secret-value");
        for credential in [Credential::bearer(&key), Credential::api_key(&key)] {
            let debug = format!("{credential:?}");
            assert!(!debug.contains("sk-secret"), "{debug}");
        }
    }

    #[test]
    fn bearer_and_api_key_headers() {
        let key = HeaderValue::from_static("k1");
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let (name, value) = runtime.block_on(Credential::bearer(&key).header()).expect("header");
        assert_eq!(name, header::AUTHORIZATION);
        assert_eq!(value, "Bearer k1");
        assert!(value.is_sensitive());
        let (name, value) = runtime.block_on(Credential::api_key(&key).header()).expect("header");
        assert_eq!(name, "api-key");
        assert_eq!(value, "k1");
        assert!(value.is_sensitive());
    }
}
