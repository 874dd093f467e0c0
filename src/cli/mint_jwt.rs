//! The `mint-jwt` subcommand: a short-lived RS256 client token, signed with a private key
//! file, as an app's backend would mint it.
//!
//! Errors are one line on stderr with exit code 2; they name the file, never its content.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::{fail, output};

/// Arguments of `mint-jwt`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// RSA private key PEM (`BEGIN PRIVATE KEY` or `BEGIN RSA PRIVATE KEY`).
    #[arg(long, value_name = "PRIVATE.pem")]
    pub key: PathBuf,
    /// The `kid` under which the proxy knows the public key (`JWT_PUBLIC_KEYS`).
    #[arg(long)]
    pub kid: String,
    /// The product whose upstream key the token may use (`product` claim).
    #[arg(long)]
    pub product: String,
    /// The user the token acts for (`sub` claim).
    #[arg(long)]
    pub user: String,
    /// Lifetime in seconds (the proxy refuses more than `JWT_MAX_TTL_SECONDS`).
    #[arg(long, default_value_t = 300)]
    pub ttl: u64,
    /// `iss` claim, for a proxy that sets `JWT_ISSUER`.
    #[arg(long)]
    pub issuer: Option<String>,
    /// `aud` claim, for a proxy that sets `JWT_AUDIENCE`.
    #[arg(long)]
    pub audience: Option<String>,
}

/// The claims of a minted token.
#[derive(Debug, Serialize)]
pub struct Claims<'a> {
    pub sub: &'a str,
    pub product: &'a str,
    pub iat: u64,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<&'a str>,
}

/// Signs `claims` with RS256 under `kid`. Fails when `key` is not a usable RSA private key
/// (jsonwebtoken only checks the key when it signs).
pub fn sign(key: &EncodingKey, kid: &str, claims: &Claims<'_>) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Runs the subcommand; returns the process exit code.
pub fn run(args: &Args) -> ExitCode {
    const COMMAND: &str = "mint-jwt";
    if args.ttl == 0 {
        return fail(COMMAND, "--ttl must be at least 1 second");
    }
    if args.user.is_empty() || args.product.is_empty() || args.kid.is_empty() {
        return fail(COMMAND, "--kid, --product and --user must not be empty");
    }
    let path = args.key.display();
    let pem = match std::fs::read(&args.key) {
        Ok(pem) => pem,
        // The io error names the cause (not found, permission denied), never the content.
        Err(error) => return fail(COMMAND, &format!("cannot read --key {path}: {error}")),
    };
    let not_rsa = || {
        fail(
            COMMAND,
            &format!("--key {path} is not a usable RSA private key PEM (2048 to 8192 bits)"),
        )
    };
    let Ok(key) = EncodingKey::from_rsa_pem(&pem) else {
        return not_rsa();
    };
    let iat = unix_now();
    let Some(exp) = iat.checked_add(args.ttl) else {
        return fail(COMMAND, "--ttl is too large");
    };
    let claims = Claims {
        sub: &args.user,
        product: &args.product,
        iat,
        exp,
        iss: args.issuer.as_deref(),
        aud: args.audience.as_deref(),
    };
    // A public key or an EC key passes `from_rsa_pem` and fails only here.
    let Ok(token) = sign(&key, &args.kid, &claims) else {
        return not_rsa();
    };
    output::line(&token);
    ExitCode::SUCCESS
}
