//! The `sign` subcommand: the HMAC headers of one request, in curl's `-H` form.
//!
//! The secret is read from an environment variable the user names, never from the
//! command line (where shell history and `ps` would keep it), and is never printed.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::{fail, mint_jwt::unix_now, output};

/// Arguments of `sign`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The client id (`X-Client-Id`, a key of `CLIENT_HMAC_SECRETS`).
    #[arg(long)]
    pub client: String,
    /// Name of the environment variable that holds the client's secret.
    #[arg(long, value_name = "VAR")]
    pub secret_env: String,
    /// The product (`X-Product-Id`).
    #[arg(long)]
    pub product: String,
    /// The user (`X-User-Id`).
    #[arg(long)]
    pub user: String,
    /// File with the exact request body (`-` for stdin); absent: an empty body.
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// HTTP method.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// Request path (a query is not signed and is dropped here).
    #[arg(long, default_value = "/v1/chat/completions")]
    pub path: String,
    /// Send no `X-Nonce` (only for a proxy with `HMAC_REQUIRE_NONCE=false`).
    #[arg(long)]
    pub no_nonce: bool,
}

/// What the signature covers besides the body.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub timestamp: u64,
    pub method: &'a str,
    /// Without query.
    pub path: &'a str,
    pub client: &'a str,
    pub product: &'a str,
    pub user: &'a str,
    /// `""` when the request has no `X-Nonce`.
    pub nonce: &'a str,
}

impl Request<'_> {
    /// The contract's string to sign.
    pub fn string_to_sign(&self, body: &[u8]) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.timestamp,
            self.method,
            self.path,
            self.client,
            self.product,
            self.user,
            self.nonce,
            hex::encode(Sha256::digest(body)),
        )
    }

    /// Lowercase hex of HMAC-SHA256(secret, string to sign).
    pub fn signature(&self, secret: &[u8], body: &[u8]) -> String {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(self.string_to_sign(body).as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// A fresh nonce: 32 characters of `[A-Za-z0-9_-]` (192 random bits).
pub fn random_nonce() -> Result<String, aws_lc_rs::error::Unspecified> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)?;
    // 64 symbols: the low six bits of each byte pick one without bias.
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
        .collect())
}

/// Runs the subcommand; returns the process exit code.
pub fn run(args: &Args) -> ExitCode {
    const COMMAND: &str = "sign";
    let secret = match std::env::var(&args.secret_env) {
        Ok(secret) if !secret.is_empty() => secret,
        _ => {
            return fail(
                COMMAND,
                &format!("environment variable {} (--secret-env) is not set", args.secret_env),
            );
        }
    };
    let body = match read_body(args.body.as_ref()) {
        Ok(body) => body,
        Err(message) => return fail(COMMAND, &message),
    };
    let nonce = if args.no_nonce {
        String::new()
    } else {
        match random_nonce() {
            Ok(nonce) => nonce,
            Err(_) => return fail(COMMAND, "the system random source failed"),
        }
    };
    let method = args.method.to_ascii_uppercase();
    let path = args.path.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return fail(COMMAND, "--path must start with /");
    }
    let request = Request {
        timestamp: unix_now(),
        method: &method,
        path,
        client: &args.client,
        product: &args.product,
        user: &args.user,
        nonce: &nonce,
    };
    let signature = request.signature(secret.as_bytes(), &body);
    let mut headers = vec![
        ("X-Client-Id", request.client),
        ("X-Product-Id", request.product),
        ("X-User-Id", request.user),
    ];
    let timestamp = request.timestamp.to_string();
    headers.push(("X-Timestamp", &timestamp));
    if !args.no_nonce {
        headers.push(("X-Nonce", &nonce));
    }
    headers.push(("X-Signature", &signature));
    for (name, value) in headers {
        output::line(&format!("-H {}", shell_quote(&format!("{name}: {value}"))));
    }
    ExitCode::SUCCESS
}

fn read_body(path: Option<&PathBuf>) -> Result<Vec<u8>, String> {
    match path {
        None => Ok(Vec::new()),
        Some(path) if path.as_os_str() == "-" => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .map_err(|error| format!("cannot read the body from stdin: {error}"))?;
            Ok(body)
        }
        Some(path) => std::fs::read(path).map_err(|error| format!("cannot read --body {}: {error}", path.display())),
    }
}

/// `text` in single quotes for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_string_to_sign_follows_the_contract() {
        let request = Request {
            timestamp: 1_700_000_000,
            method: "POST",
            path: "/v1/chat/completions",
            client: "desk",
            product: "demo",
            user: "alice",
            nonce: "abcdefghijklmnop",
        };
        assert_eq!(
            request.string_to_sign(b""),
            "1700000000\nPOST\n/v1/chat/completions\ndesk\ndemo\nalice\nabcdefghijklmnop\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn the_signature_matches_an_independent_hmac_sha256() {
        // The contract's string for this request, written out by hand.
        let request = Request {
            timestamp: 1,
            method: "GET",
            path: "/v1/models",
            client: "c",
            product: "p",
            user: "u",
            nonce: "",
        };
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"key").expect("any key length");
        mac.update(b"1\nGET\n/v1/models\nc\np\nu\n\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(request.signature(b"key", b""), hex::encode(mac.finalize().into_bytes()));
    }

    #[test]
    fn the_readme_worked_example_signs_as_documented() {
        let request = Request {
            timestamp: 1_764_067_200,
            method: "POST",
            path: "/v1/chat/completions",
            client: "desktop-app",
            product: "notes",
            user: "user-42",
            nonce: "Zx8kq2LwP0aVb7Nc4Rt9Ys1M",
        };
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}]}"#;
        assert_eq!(
            request.signature(b"an-example-secret-of-at-least-32-bytes!", body),
            "7366d46a7a9a3fa02a2ee73d6a3e049158f75a69f50ce5a1b0105a0f434a0687"
        );
    }

    #[test]
    fn nonces_are_32_url_safe_characters_and_differ() {
        let a = random_nonce().expect("random");
        let b = random_nonce().expect("random");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_ne!(a, b);
    }

    #[test]
    fn shell_quoting_survives_single_quotes() {
        assert_eq!(shell_quote("X-User-Id: o'brien"), r"'X-User-Id: o'\''brien'");
    }
}
