//! api-key-server: a gateway that lets apps call LLM APIs without holding the
//! provider's API key.
//!
//! A request's way through the crate:
//!
//! - [`server`] accepts connections and drains them on SIGTERM;
//! - [`app`] composes the routes and the layers ([`telemetry`]: request id and log line);
//! - [`proxy`] is the request path, one straight line:
//!   body -> [`auth`] (JWT or HMAC, to an [`auth::Identity`]) -> [`validate`] ->
//!   [`limit`] (bucket and daily quota, in [`store`] or memory) -> [`upstream`];
//! - [`error`] turns every failure into the contract's error envelope.
//!
//! [`metrics`] counts requests, upstream latency and limiter decisions for Prometheus.
//! [`clock`] is the one time source of the auth checks and the limiter, so tests can move
//! it. [`settings`] reads the environment once at startup; [`cli`] holds the `dev`,
//! `mint-jwt` and `sign` subcommands.

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod error;
pub mod limit;
mod lock;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod upstream;
pub mod validate;
