//! api-key-server: a gateway that lets apps call LLM APIs without holding the
//! provider's API key.
//!
//! A request's way through the crate:
//!
//! - [`server`] accepts connections and drains them on SIGTERM;
//! - [`app`] holds the state and the route table, and writes each request's log line
//!   ([`telemetry`]: request id and log line);
//! - [`routes`] has one handler per API, each the contract's order of checks, one call
//!   per step: body ([`request`]) -> [`auth`] (JWT or HMAC, to an [`auth::Identity`]) ->
//!   [`validate`] -> [`ownership`] (stored responses) -> [`limit`] (bucket and daily
//!   quota, in [`store`] or memory) -> [`upstream`];
//! - a handler hands back one [`request::Outcome`] (the response and what the log line
//!   needs); [`error`] turns every failure into the contract's error envelope.
//!
//! [`metrics`] counts requests, upstream latency and limiter decisions for Prometheus.
//! [`clock`] is the one time source of the auth checks and the limiter, so tests can move
//! it. [`budget`] (prices, reservations in memory and Redis, the outage rule), [`usage`]
//! (token usage read from bodies and streams as they pass) and [`day`] (the day in
//! `DAY_TIMEZONE`) are the building blocks of spend control, not yet on the request path.
//! [`settings`] reads the environment once at startup; [`cli`] holds the `dev`,
//! `mint-jwt` and `sign` subcommands.

pub mod app;
pub mod auth;
pub mod budget;
pub mod cli;
pub mod clock;
pub mod day;
pub mod error;
pub mod limit;
mod lock;
pub mod meter;
pub mod metrics;
pub mod ownership;
pub mod request;
pub mod routes;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod upstream;
pub mod usage;
pub mod validate;
