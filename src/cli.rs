//! Subcommands besides `serve`: `dev`, `mint-jwt` and `sign`.

pub mod dev;
pub mod mint_jwt;
pub mod sign;
