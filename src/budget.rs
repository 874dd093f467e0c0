//! Spend control: prices and amounts as integers ([`price`]), and the reservations that
//! admit a request only while its scope's budget can pay for its worst case.
//!
//! Nothing here reads the request or the response: the caller hands in the reservation
//! and the usage it measured ([`crate::usage`]). Money is integers of 1e-9 USD
//! ([`price::Nanos`]), never floats.

pub mod price;
