//! The `dev` subcommand: a zero-configuration proxy on 127.0.0.1 for trying things out,
//! like `vault server -dev`.
//!
//! It generates an ephemeral RSA key and HMAC secret, configures product `demo` (JWT kid
//! `dev`, HMAC client `dev-client`), forwards to OpenAI when `OPENAI_API_KEY` is set and
//! otherwise to a built-in fake upstream, and prints a banner with a fresh token and
//! ready-to-paste calls. A second product, `partner`, has an upstream of its own (a
//! second fake, with Azure's `api-key` header and its own model), so that per-product
//! routing (`PRODUCT_UPSTREAMS`) can be seen at work. It never binds anything but 127.0.0.1. The secrets it prints are
//! its own, made for this run; a secret the user set (`OPENAI_API_KEY`) is never printed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use jsonwebtoken::EncodingKey;

use super::fake_upstream::FakeUpstream;
use super::mint_jwt::{self, Claims, unix_now};
use super::{fail, output};
use crate::server;
use crate::settings::{KNOWN_VARIABLES, LogFormat, PREFIX, Settings};
use crate::telemetry;

/// Arguments of `dev` (none: everything is generated or read from the environment).
#[derive(Debug, clap::Args)]
pub struct Args {}

const COMMAND: &str = "dev";
const PRODUCT: &str = "demo";
const KID: &str = "dev";
const CLIENT: &str = "dev-client";
const USER: &str = "dev-user";
const MODEL: &str = "gpt-4o-mini";
const PARTNER: &str = "partner";
const PARTNER_MODEL: &str = "partner-chat-mini";
/// The partner fake accepts any key; this placeholder is no secret.
const PARTNER_KEY: &str = "dev-partner-fake-key";
const JWT_TTL_SECONDS: u64 = 3600;

/// Runs the subcommand; returns the process exit code.
pub fn run(_args: &Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(COMMAND, &format!("cannot start the runtime: {error}")),
    };
    runtime.block_on(serve())
}

/// The generated credentials of one run.
struct DevKeys {
    encoding_key: EncodingKey,
    public_pem: String,
    hmac_secret: String,
}

impl DevKeys {
    fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let pair = KeyPair::generate(KeySize::Rsa2048)?;
        let private_pem = pem("PRIVATE KEY", pair.as_der()?.as_ref());
        let public_pem = pem("PUBLIC KEY", pair.public_key().as_der()?.as_ref());
        let encoding_key =
            EncodingKey::from_rsa_pem(private_pem.as_bytes()).map_err(|_| aws_lc_rs::error::Unspecified)?;
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret)?;
        Ok(Self {
            encoding_key,
            public_pem,
            hmac_secret: hex::encode(secret),
        })
    }
}

/// DER in PEM armour: base64 in lines of 64 characters.
fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    let _ = writeln!(text, "-----END {label}-----");
    text
}

async fn serve() -> ExitCode {
    telemetry::init(LogFormat::Text);
    let Ok(keys) = DevKeys::generate() else {
        return fail(COMMAND, "cannot generate the development keys");
    };
    let openai_key = std::env::var("OPENAI_API_KEY")
        .ok()
        .filter(|key| !key.trim().is_empty());
    let fake = if openai_key.is_none() {
        match FakeUpstream::start().await {
            Ok(fake) => Some(fake),
            Err(error) => return fail(COMMAND, &format!("cannot start the fake upstream: {error}")),
        }
    } else {
        None
    };

    let partner = match FakeUpstream::start_at("/partner/v1", "the partner's fake upstream (product partner)").await {
        Ok(partner) => partner,
        Err(error) => return fail(COMMAND, &format!("cannot start the fake upstream: {error}")),
    };
    let mut vars = variables(&keys, openai_key.as_deref(), fake.as_ref().map(FakeUpstream::url));
    add_partner(&mut vars, &partner.base_url());
    let settings = match Settings::from_lookup(|name| vars.get(name).cloned()) {
        Ok(settings) => settings,
        Err(error) => return fail(COMMAND, &format!("configuration error: {error}")),
    };
    for name in vars.keys() {
        if let Some(rest) = name.strip_prefix(PREFIX)
            && !KNOWN_VARIABLES.contains(&rest)
        {
            tracing::warn!(variable = %name, "unknown setting ignored (a typo?)");
        }
    }

    let stop = server::shutdown_signal();
    // Loopback only, whatever the environment says: dev keys must not be reachable.
    let running = match server::start(settings, IpAddr::V4(Ipv4Addr::LOCALHOST)).await {
        Ok(running) => running,
        Err(error) => return fail(COMMAND, &format!("cannot bind 127.0.0.1: {error}")),
    };
    tracing::info!(address = %running.addr, "listening");

    let iat = unix_now();
    let claims = Claims {
        sub: USER,
        product: PRODUCT,
        iat,
        exp: iat + JWT_TTL_SECONDS,
        iss: None,
        aud: None,
    };
    let partner_claims = Claims {
        product: PARTNER,
        ..claims
    };
    let (Ok(token), Ok(partner_token)) = (
        mint_jwt::sign(&keys.encoding_key, KID, &claims),
        mint_jwt::sign(&keys.encoding_key, KID, &partner_claims),
    ) else {
        running.shutdown().await;
        return fail(COMMAND, "cannot sign the development token");
    };
    let upstream = match &fake {
        Some(fake) => format!(
            "built-in fake OpenAI at {} (set OPENAI_API_KEY to use OpenAI)",
            fake.url()
        ),
        None => "OpenAI, with the key in OPENAI_API_KEY".to_owned(),
    };
    let url = format!("http://{}", running.addr);
    output::line(&banner(&url, &token, &keys.hmac_secret, &upstream));
    output::line(&partner_banner(&url, &partner_token, &partner.base_url()));

    stop.await;
    running.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// The settings of a dev run: the user's own `API_KEY_SERVER_*` variables (limits and
/// the like), with the credentials and products replaced by the generated ones.
fn variables(keys: &DevKeys, openai_key: Option<&str>, fake_url: Option<String>) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = std::env::vars().filter(|(name, _)| name.starts_with(PREFIX)).collect();
    let mut set = |name: &str, value: String| {
        vars.insert(format!("{PREFIX}{name}"), value);
    };
    // The fake upstream accepts any key; a placeholder keeps the settings valid.
    let product_key = openai_key.unwrap_or("sk-dev-fake-upstream");
    set("PRODUCT_KEYS", serde_json::json!({ PRODUCT: product_key }).to_string());
    set(
        "JWT_PUBLIC_KEYS",
        serde_json::json!({ KID: keys.public_pem }).to_string(),
    );
    set(
        "CLIENT_HMAC_SECRETS",
        serde_json::json!({ CLIENT: keys.hmac_secret }).to_string(),
    );
    match fake_url {
        Some(url) => set("OPENAI_BASE_URL", url),
        None => {
            vars.entry(format!("{PREFIX}OPENAI_BASE_URL"))
                .or_insert_with(|| "https://api.openai.com/v1/chat/completions".to_owned());
        }
    }
    // The metrics listener would bind beyond loopback; dev has no use for it.
    if vars.remove(&format!("{PREFIX}METRICS_PORT")).is_some() {
        tracing::warn!("{PREFIX}METRICS_PORT is ignored in dev mode (it listens on 127.0.0.1 only)");
    }
    vars.insert(
        "PORT".to_owned(),
        std::env::var("PORT")
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "8080".to_owned()),
    );
    vars
}

/// Product `partner`: its own upstream (the second fake, `auth: api-key`) and models.
/// Replaces any `PRODUCT_UPSTREAMS` of the user's: dev's products are its own.
fn add_partner(vars: &mut HashMap<String, String>, base_url: &str) {
    let keys_name = format!("{PREFIX}PRODUCT_KEYS");
    let mut keys: serde_json::Map<String, serde_json::Value> = vars
        .get(&keys_name)
        .and_then(|keys| serde_json::from_str(keys).ok())
        .unwrap_or_default();
    keys.insert(PARTNER.to_owned(), PARTNER_KEY.into());
    vars.insert(keys_name, serde_json::Value::Object(keys).to_string());
    let upstreams = serde_json::json!({
        PARTNER: {"base_url": base_url, "auth": "api-key", "models": [PARTNER_MODEL]},
    });
    vars.insert(format!("{PREFIX}PRODUCT_UPSTREAMS"), upstreams.to_string());
}

/// The second product's part of the banner.
fn partner_banner(url: &str, token: &str, base_url: &str) -> String {
    let body = format!(r#"{{"model":"{PARTNER_MODEL}","messages":[{{"role":"user","content":"Say hello"}}]}}"#);
    [
        format!("Per-product upstreams: product {PARTNER} goes to its own upstream, {base_url}"),
        format!("(PRODUCT_UPSTREAMS, auth api-key, models [\"{PARTNER_MODEL}\"]); its token:"),
        format!("PARTNER_JWT={token}"),
        format!(
            "  curl -sS {url}/v1/chat/completions -H 'Authorization: Bearer {token}' \\\n    \
             -H 'Content-Type: application/json' -d '{body}'"
        ),
        format!("  curl -sS {url}/v1/models -H 'Authorization: Bearer {token}'"),
        String::new(),
        "Ctrl-C stops the server.".to_owned(),
    ]
    .join("\n")
}

/// What the user needs to make a first call. The `KEY=value` lines at the start of a line
/// are for scripts (`examples/run-all.sh` reads them).
fn banner(url: &str, token: &str, hmac_secret: &str, upstream: &str) -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|path| path.to_str().map(str::to_owned))
        .map_or_else(|| "api-key-server".to_owned(), |path| shell_word(&path));
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Say hello"}}]}}"#);
    let lines = [
        String::new(),
        "api-key-server dev: a local proxy with keys made for this run (nothing here is for production)".to_owned(),
        format!("upstream: {upstream}"),
        String::new(),
        format!("URL={url}"),
        format!("JWT={token}"),
        format!("HMAC_CLIENT={CLIENT}"),
        format!("export DEV_HMAC_SECRET={hmac_secret}"),
        String::new(),
        format!("The token is for product {PRODUCT}, user {USER}, valid for 1 hour."),
        String::new(),
        "curl:".to_owned(),
        format!(
            "  curl -sS {url}/v1/chat/completions -H 'Authorization: Bearer {token}' \\\n    \
             -H 'Content-Type: application/json' -d '{body}'"
        ),
        String::new(),
        "Python (pip install openai):".to_owned(),
        "  from openai import OpenAI".to_owned(),
        format!("  client = OpenAI(base_url=\"{url}/v1\", api_key=\"{token}\")"),
        format!(
            "  reply = client.chat.completions.create(model=\"{MODEL}\", \
             messages=[{{\"role\": \"user\", \"content\": \"Say hello\"}}])"
        ),
        "  print(reply.choices[0].message.content)".to_owned(),
        String::new(),
        "HMAC (run the export line above first; sign prints curl -H arguments):".to_owned(),
        format!("  echo '{body}' > body.json"),
        format!(
            "  {binary} sign --client {CLIENT} --secret-env DEV_HMAC_SECRET --product {PRODUCT} --user {USER} \\\n    \
             --body body.json | xargs curl -sS {url}/v1/chat/completions \\\n    \
             -H 'Content-Type: application/json' --data-binary @body.json"
        ),
    ];
    lines.join("\n")
}

/// `text` as one shell word (quoted only when needed).
fn shell_word(text: &str) -> String {
    if text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:".contains(&b))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_sign_tokens_that_the_public_pem_verifies() {
        let keys = DevKeys::generate().expect("keys");
        assert!(keys.public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert_eq!(keys.hmac_secret.len(), 64);
        let iat = unix_now();
        let claims = Claims {
            sub: USER,
            product: PRODUCT,
            iat,
            exp: iat + 60,
            iss: None,
            aud: None,
        };
        let token = mint_jwt::sign(&keys.encoding_key, KID, &claims).expect("signs");
        let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(keys.public_pem.as_bytes()).expect("public PEM");
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).expect("verifies");
        assert_eq!(data.claims["product"], PRODUCT);
        assert_eq!(data.header.kid.as_deref(), Some(KID));
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let text = pem("PUBLIC KEY", &[7u8; 100]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN PUBLIC KEY-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last().copied(), Some("-----END PUBLIC KEY-----"));
    }
}
