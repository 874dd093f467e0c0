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
