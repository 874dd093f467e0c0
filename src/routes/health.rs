//! `GET /healthz`, `GET /health`: no authentication, no state.

use bytes::Bytes;

use crate::request::Outcome;

/// `200 {"status":"ok"}` while serving.
pub fn check() -> Outcome {
    Outcome::json(Bytes::from_static(b"{\"status\":\"ok\"}"))
}
