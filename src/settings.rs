//! Environment -> typed, validated [`Settings`], read once at startup.
//!
//! Every setting of the contract is parsed here into the type the rest of the crate uses
//! (durations, header values, decoding keys), so no other module re-checks configuration.
//! Errors name the variable and what is wrong and never echo a value: a malformed variable
//! may well hold a secret. Keys and secrets are held in [`Secret`], which never prints.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};
use jsonwebtoken::DecodingKey;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use crate::clock::Clock;
use crate::day::DayZone;

mod budgets;
mod upstreams;

pub use self::budgets::BudgetSettings;
pub use self::upstreams::{METADATA_HOST_VARIABLE, MetadataHost, ProductUpstream, UpstreamAuth};

/// Prefix of every variable this service reads (except `PORT`, which Cloud Run sets).
pub const PREFIX: &str = "API_KEY_SERVER_";

/// Every variable the contract defines, without the prefix. Anything else with the prefix
/// is a typo and is reported as a warning at startup.
pub const KNOWN_VARIABLES: &[&str] = &[
    "PRODUCT_KEYS",
    "PRODUCT_UPSTREAMS",
    "JWT_PUBLIC_KEYS",
    "CLIENT_HMAC_SECRETS",
    "CLIENT_PRODUCTS",
    "ALLOWED_MODELS",
    "ALLOWED_EMBEDDING_MODELS",
    "ALLOWED_TOOLS",
    "MAX_TOKENS",
    "DEFAULT_TOKENS_FIELD",
    "TEMPERATURE_RANGE",
    "OPENAI_BASE_URL",
    "UPSTREAM_TIMEOUT_SECONDS",
    "UPSTREAM_IDLE_TIMEOUT_SECONDS",
    "MAX_BODY_BYTES",
    "CLIENT_TIMEOUT_SECONDS",
    "REDIS_URL",
    "REDIS_CLUSTER",
    "REDIS_CA_CERT",
    "REDIS_PREFIX",
    "REDIS_TIMEOUT_MS",
    "RATE_LIMIT_CAPACITY",
    "RATE_LIMIT_REFILL_PER_SECOND",
    "DAILY_QUOTA",
    "PRODUCT_LIMITS",
    "CLIENT_LIMITS",
    "MODEL_PRICES",
    "DAILY_BUDGET_USD",
    "BUDGET_RESERVATION_SECONDS",
    "BUDGET_OUTAGE_SHARE",
    "DAY_TIMEZONE",
    "HMAC_CLOCK_TOLERANCE_SECONDS",
    "HMAC_REQUIRE_NONCE",
    "HMAC_NONCE_CAPACITY",
    "JWT_MAX_TTL_SECONDS",
    "JWT_LEEWAY_SECONDS",
    "JWT_ISSUER",
    "JWT_AUDIENCE",
    "SHUTDOWN_GRACE_SECONDS",
    "LOG_FORMAT",
    "GCP_PROJECT_ID",
    "METRICS_PORT",
];

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself; call sites are the few places that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration error: the variable and what is wrong with it, never its value.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct SettingsError {
    pub variable: String,
    pub reason: String,
}

impl SettingsError {
    fn new(name: &str, reason: impl Into<String>) -> Self {
        // `PORT` (Cloud Run's) and `GCE_METADATA_HOST` (Google's libraries') are read
        // without the prefix.
        let variable = if name == "PORT" || name == METADATA_HOST_VARIABLE {
            name.to_owned()
        } else {
            format!("{PREFIX}{name}")
        };
        Self {
            variable,
            reason: reason.into(),
        }
    }
}

/// Which field the proxy adds when a request sets no token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokensField {
    MaxTokens,
    MaxCompletionTokens,
}

impl TokensField {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The request rules of `POST /v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct Policy {
    /// In configuration order, for `GET /v1/models`.
    pub allowed_models: Vec<String>,
    pub max_tokens: NonZeroU32,
    pub default_tokens_field: TokensField,
    pub temperature_min: f64,
    pub temperature_max: f64,
    /// `ALLOWED_EMBEDDING_MODELS`, in configuration order.
    pub embedding_models: Vec<String>,
    /// `ALLOWED_TOOLS`: the tool `type`s a request may declare.
    pub allowed_tools: Vec<String>,
}

impl Policy {
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.iter().any(|m| m == model)
    }

    pub fn allows_embedding_model(&self, model: &str) -> bool {
        self.embedding_models.iter().any(|m| m == model)
    }

    pub fn allows_tool(&self, kind: &str) -> bool {
        self.allowed_tools.iter().any(|t| t == kind)
    }
}

/// JWT verification settings; empty `keys` means JWT is off.
#[derive(Clone)]
pub struct JwtSettings {
    pub keys: HashMap<String, DecodingKey>,
    pub max_ttl: Duration,
    pub leeway: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("JwtSettings")
            .field("kids", &kids)
            .field("max_ttl", &self.max_ttl)
            .field("leeway", &self.leeway)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// HMAC verification settings; empty `secrets` means HMAC is off.
#[derive(Debug, Clone)]
pub struct HmacSettings {
    pub secrets: HashMap<String, Secret<Vec<u8>>>,
    /// `None`: every client may use every product.
    pub client_products: Option<HashMap<String, HashSet<String>>>,
    pub clock_tolerance: Duration,
    pub require_nonce: bool,
    pub nonce_capacity: usize,
}

/// One bucket and daily quota size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub capacity: NonZeroU32,
    pub refill_per_second: f64,
    pub daily_quota: NonZeroU64,
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub default: Limits,
    /// Overrides of `default` per product.
    pub products: HashMap<String, Limits>,
    /// Extra bucket and quota per HMAC client.
    pub clients: HashMap<String, Limits>,
}

impl LimitSettings {
    /// The (product, user) limits for `product`.
    pub fn for_product(&self, product: &str) -> Limits {
        self.products.get(product).copied().unwrap_or(self.default)
    }
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// May carry a password: printed only through [`Secret`].
    pub url: Secret<String>,
    pub cluster: bool,
    /// PEM of the CA that signs the server certificate (`rediss://` only).
    pub ca_cert: Option<Vec<u8>>,
    pub prefix: String,
    pub timeout: Duration,
}

impl RedisSettings {
    /// The URL without user info, for logs.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(self.url.expose()) {
            Ok(mut url) => {
                let _ = url.set_username("");
                let _ = url.set_password(None);
                url.to_string()
            }
            Err(_) => "<unparsable>".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub url: Uri,
    pub timeout: Duration,
    pub idle_timeout: Duration,
}

/// Everything the service is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port: u16,
    /// Product id -> its upstream API key as a header value, marked sensitive so that
    /// hyper and our logs never print it. A product whose upstream has `auth: google` may
    /// have none.
    pub product_keys: HashMap<Arc<str>, Secret<HeaderValue>>,
    /// Every product: the keys of `PRODUCT_KEYS` and of `PRODUCT_UPSTREAMS`.
    pub products: HashSet<Arc<str>>,
    /// `PRODUCT_UPSTREAMS`: the products with an upstream of their own.
    pub product_upstreams: HashMap<Arc<str>, ProductUpstream>,
    /// `GCE_METADATA_HOST`: where `auth: google` tokens come from.
    pub metadata_host: MetadataHost,
    pub jwt: JwtSettings,
    pub hmac: HmacSettings,
    /// The request rules of products that use the default upstream's models.
    pub policy: Policy,
    /// The request rules of products whose upstream names its own `models`: [`Self::policy`]
    /// with those models (see [`Settings::policy_for`]).
    pub product_policies: HashMap<Arc<str>, Policy>,
    pub upstream: UpstreamSettings,
    pub max_body_bytes: usize,
    pub client_timeout: Duration,
    pub redis: Option<RedisSettings>,
    pub limits: LimitSettings,
    /// `DAY_TIMEZONE`: whose midnight starts a new day for daily quotas and budgets.
    pub day_zone: DayZone,
    /// `MODEL_PRICES`, the budgets and how reservations behave.
    pub budgets: BudgetSettings,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub gcp_project_id: Option<String>,
    pub metrics_port: Option<u16>,
    /// Not a variable: the time JWT and HMAC checks, nonces and in-memory limits are
    /// decided at. The system's; tests that run the server in-process put in a
    /// [`ManualClock`](crate::clock::ManualClock) to see expiry without waiting for it.
    pub clock: Clock,
}

/// What [`Settings::from_lookup`] found besides the settings themselves.
#[derive(Debug, Default)]
pub struct Warnings {
    /// Full names of prefixed variables the contract does not define.
    pub unknown_variables: Vec<String>,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<(Self, Warnings), SettingsError> {
        let mut warnings = Warnings::default();
        for (name, _) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if let Some(rest) = name.strip_prefix(PREFIX)
                && !KNOWN_VARIABLES.contains(&rest)
            {
                warnings.unknown_variables.push(name.to_owned());
            }
        }
        warnings.unknown_variables.sort();
        let settings = Self::from_lookup(|name| std::env::var(name).ok())?;
        Ok((settings, warnings))
    }

    /// Reads settings through `lookup` (full variable name -> value), so tests and `dev`
    /// pass a map instead of changing the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let env = Env { lookup: &lookup };

        let port = env.parse_raw("PORT", |v| {
            v.parse::<u16>()
                .map_err(|_| "expected a port number from 0 to 65535".to_owned())
        })?;

        let product_upstreams = env.product_upstreams()?;
        let product_keys = env.product_keys(&product_upstreams)?;
        let products: HashSet<Arc<str>> = product_keys.keys().chain(product_upstreams.keys()).cloned().collect();
        let metadata_host = env.metadata_host()?;
        let jwt = env.jwt()?;
        let hmac = env.hmac(&products)?;
        if jwt.keys.is_empty() && hmac.secrets.is_empty() {
            return Err(SettingsError::new(
                "JWT_PUBLIC_KEYS",
                "no client authentication is configured: set JWT_PUBLIC_KEYS or CLIENT_HMAC_SECRETS",
            ));
        }
        let policy = env.policy()?;
        let product_policies = upstreams::product_policies(&policy, &product_upstreams);
        let upstream = UpstreamSettings {
            url: env
                .parse("OPENAI_BASE_URL", parse_upstream_url)?
                .unwrap_or_else(|| Uri::from_static("https://api.openai.com/v1/chat/completions")),
            timeout: env.seconds("UPSTREAM_TIMEOUT_SECONDS", 120.0)?,
            idle_timeout: env.seconds("UPSTREAM_IDLE_TIMEOUT_SECONDS", 300.0)?,
        };
        let max_body_bytes = env.positive_int::<usize>("MAX_BODY_BYTES")?.unwrap_or(1_048_576);
        let client_timeout = env.seconds("CLIENT_TIMEOUT_SECONDS", 30.0)?;
        let redis = env.redis()?;
        let (limits, budget_overrides) = env.limits(&products, &hmac)?;
        let day_zone = env
            .parse("DAY_TIMEZONE", |v| DayZone::new(v).map_err(|e| e.to_string()))?
            .unwrap_or_else(DayZone::utc);
        let budgets = env.budgets(budget_overrides)?;
        budgets::check_prices(&budgets, &products, &policy, &product_policies)?;
        let shutdown_grace = env
            .parse("SHUTDOWN_GRACE_SECONDS", |v| {
                parse_seconds(v, true).ok_or_else(|| "expected a number of seconds >= 0".to_owned())
            })?
            .unwrap_or(Duration::from_secs(8));
        let log_format = env
            .parse("LOG_FORMAT", |v| match v {
                "json" => Ok(LogFormat::Json),
                "text" => Ok(LogFormat::Text),
                _ => Err("expected \"json\" or \"text\"".to_owned()),
            })?
            .unwrap_or(LogFormat::Json);
        let gcp_project_id = env
            .string("GCP_PROJECT_ID")
            .or_else(|| lookup("GOOGLE_CLOUD_PROJECT").filter(|v| !v.is_empty()));
        let metrics_port = env.parse("METRICS_PORT", |v| {
            v.parse::<u16>()
                .map_err(|_| "expected a port number from 0 to 65535".to_owned())
        })?;

        Ok(Self {
            port: port.unwrap_or(8080),
            product_keys,
            products,
            product_upstreams,
            metadata_host,
            jwt,
            hmac,
            policy,
            product_policies,
            upstream,
            max_body_bytes,
            client_timeout,
            redis,
            limits,
            day_zone,
            budgets,
            shutdown_grace,
            log_format,
            gcp_project_id,
            metrics_port,
            clock: Clock::system(),
        })
    }
}

/// Typed access to the variables, each error naming its variable.
struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    /// The value of `API_KEY_SERVER_<name>`; an empty value counts as unset.
    fn string(&self, name: &str) -> Option<String> {
        (self.lookup)(&format!("{PREFIX}{name}")).filter(|v| !v.is_empty())
    }

    fn parse<T>(&self, name: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Option<T>, SettingsError> {
        self.string(name)
            .map(|v| parse(v.trim()).map_err(|reason| SettingsError::new(name, reason)))
            .transpose()
    }

    /// Like [`Env::parse`] for an unprefixed variable.
    fn parse_raw<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, SettingsError> {
        (self.lookup)(name)
            .filter(|v| !v.is_empty())
            .map(|v| parse(v.trim()).map_err(|reason| SettingsError::new(name, reason)))
            .transpose()
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, name: &str, expected: &str) -> Result<Option<T>, SettingsError> {
        self.parse(name, |v| {
            // serde_json's message can quote the input: say only where it went wrong.
            serde_json::from_str(v).map_err(|e| {
                format!(
                    "expected {expected} (invalid at line {}, column {})",
                    e.line(),
                    e.column()
                )
            })
        })
    }

    fn positive_int<T: std::str::FromStr + PartialOrd + Default>(
        &self,
        name: &str,
    ) -> Result<Option<T>, SettingsError> {
        self.parse(name, |v| match v.parse::<T>() {
            Ok(n) if n > T::default() => Ok(n),
            _ => Err("expected a positive integer".to_owned()),
        })
    }

    fn int<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, SettingsError> {
        self.parse(name, |v| {
            v.parse::<T>().map_err(|_| "expected a non-negative integer".to_owned())
        })
    }

    fn seconds(&self, name: &str, default: f64) -> Result<Duration, SettingsError> {
        Ok(self
            .parse(name, |v| {
                parse_seconds(v, false).ok_or_else(|| "expected a number of seconds > 0".to_owned())
            })?
            .unwrap_or_else(|| Duration::from_secs_f64(default)))
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, SettingsError> {
        Ok(self
            .parse(name, |v| match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err("expected true or false".to_owned()),
            })?
            .unwrap_or(default))
    }

    fn product_keys(
        &self,
        upstreams: &HashMap<Arc<str>, ProductUpstream>,
    ) -> Result<HashMap<Arc<str>, Secret<HeaderValue>>, SettingsError> {
        const NAME: &str = "PRODUCT_KEYS";
        let map: HashMap<String, String> = self
            .json(NAME, "a JSON object of product id to API key")?
            .unwrap_or_default();
        // Keys may be left out only when no product needs one.
        let keyless = !upstreams.is_empty() && upstreams.values().all(|u| u.auth == UpstreamAuth::Google);
        let mut keys = HashMap::with_capacity(map.len());
        for (product, key) in map {
            check_id(NAME, "product", &product)?;
            // Visible ASCII and spaces only: anything else cannot travel in a header, and
            // finding that out on the first request would be too late. `Bearer ` is
            // prepended for bearer upstreams, so that form must be valid too.
            let valid = !key.trim().is_empty()
                && key.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
                && HeaderValue::from_str(&format!("Bearer {key}")).is_ok();
            let header = HeaderValue::from_str(key.trim()).ok().filter(|_| valid);
            let Some(mut header) = header else {
                return Err(SettingsError::new(
                    NAME,
                    format!("the key of product \"{product}\" is not a valid HTTP header value"),
                ));
            };
            header.set_sensitive(true);
            keys.insert(Arc::from(product), Secret::new(header));
        }
        for (product, upstream) in upstreams {
            if upstream.auth != UpstreamAuth::Google && !keys.contains_key(product) {
                return Err(SettingsError::new(
                    NAME,
                    format!(
                        "product \"{product}\" has no key, and its upstream in {PREFIX}PRODUCT_UPSTREAMS is not auth \"google\""
                    ),
                ));
            }
        }
        if keys.is_empty() && !keyless {
            return Err(SettingsError::new(
                NAME,
                "required: a JSON object of product id to API key, with at least one product",
            ));
        }
        Ok(keys)
    }

    fn jwt(&self) -> Result<JwtSettings, SettingsError> {
        const NAME: &str = "JWT_PUBLIC_KEYS";
        let pems: HashMap<String, String> = self
            .json(NAME, "a JSON object of kid to RSA public key PEM")?
            .unwrap_or_default();
        let mut keys = HashMap::with_capacity(pems.len());
        for (kid, pem) in pems {
            if kid.is_empty() {
                return Err(SettingsError::new(NAME, "a kid is empty"));
            }
            let key = crate::auth::jwt::decoding_key_from_pem(&pem)
                .map_err(|reason| SettingsError::new(NAME, format!("key \"{kid}\": {reason}")))?;
            keys.insert(kid, key);
        }
        Ok(JwtSettings {
            keys,
            max_ttl: Duration::from_secs(self.positive_int::<u64>("JWT_MAX_TTL_SECONDS")?.unwrap_or(3600)),
            leeway: Duration::from_secs(self.int::<u64>("JWT_LEEWAY_SECONDS")?.unwrap_or(30)),
            issuer: self.string("JWT_ISSUER"),
            audience: self.string("JWT_AUDIENCE"),
        })
    }

    fn hmac(&self, products: &HashSet<Arc<str>>) -> Result<HmacSettings, SettingsError> {
        const SECRETS: &str = "CLIENT_HMAC_SECRETS";
        const PRODUCTS: &str = "CLIENT_PRODUCTS";
        let raw: HashMap<String, String> = self
            .json(SECRETS, "a JSON object of client id to shared secret")?
            .unwrap_or_default();
        let mut secrets = HashMap::with_capacity(raw.len());
        for (client, secret) in raw {
            check_id(SECRETS, "client", &client)?;
            if secret.len() < 32 {
                return Err(SettingsError::new(
                    SECRETS,
                    format!("the secret of client \"{client}\" is shorter than 32 bytes"),
                ));
            }
            secrets.insert(client, Secret::new(secret.into_bytes()));
        }

        let client_products = self
            .json::<HashMap<String, Vec<String>>>(PRODUCTS, "a JSON object of client id to a list of product ids")?
            .map(|map| {
                map.into_iter()
                    .map(|(client, list)| {
                        check_id(PRODUCTS, "client", &client)?;
                        for product in &list {
                            check_id(PRODUCTS, "product", product)?;
                        }
                        if !secrets.contains_key(&client) {
                            return Err(SettingsError::new(
                                PRODUCTS,
                                format!("names client \"{client}\", which is not in {PREFIX}{SECRETS}"),
                            ));
                        }
                        if let Some(unknown) = list.iter().find(|p| !products.contains(p.as_str())) {
                            return Err(SettingsError::new(
                                PRODUCTS,
                                format!(
                                    "names product \"{unknown}\", which is not in {PREFIX}PRODUCT_KEYS or {PREFIX}PRODUCT_UPSTREAMS"
                                ),
                            ));
                        }
                        Ok((client, list.into_iter().collect()))
                    })
                    .collect::<Result<HashMap<_, _>, _>>()
            })
            .transpose()?;

        Ok(HmacSettings {
            secrets,
            client_products,
            clock_tolerance: Duration::from_secs(self.int::<u64>("HMAC_CLOCK_TOLERANCE_SECONDS")?.unwrap_or(300)),
            require_nonce: self.bool("HMAC_REQUIRE_NONCE", true)?,
            nonce_capacity: self.positive_int::<usize>("HMAC_NONCE_CAPACITY")?.unwrap_or(1_000_000),
        })
    }

    fn policy(&self) -> Result<Policy, SettingsError> {
        let allowed_models: Vec<String> = self
            .json("ALLOWED_MODELS", "a JSON list of model names")?
            .unwrap_or_else(|| vec!["gpt-4o".to_owned(), "gpt-4o-mini".to_owned()]);
        if allowed_models.is_empty() || allowed_models.iter().any(String::is_empty) {
            return Err(SettingsError::new(
                "ALLOWED_MODELS",
                "must list at least one non-empty model name",
            ));
        }
        let max_tokens = self
            .positive_int::<u32>("MAX_TOKENS")?
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::new(2048).expect("2048 is not zero"));
        let default_tokens_field = self
            .parse("DEFAULT_TOKENS_FIELD", |v| match v {
                "max_tokens" => Ok(TokensField::MaxTokens),
                "max_completion_tokens" => Ok(TokensField::MaxCompletionTokens),
                _ => Err("expected \"max_tokens\" or \"max_completion_tokens\"".to_owned()),
            })?
            .unwrap_or(TokensField::MaxTokens);
        let [temperature_min, temperature_max] = self
            .json::<[f64; 2]>("TEMPERATURE_RANGE", "a JSON list [min, max] of two numbers")?
            .unwrap_or([0.0, 2.0]);
        if temperature_min > temperature_max {
            return Err(SettingsError::new("TEMPERATURE_RANGE", "min is greater than max"));
        }
        let embedding_models: Vec<String> = self
            .json("ALLOWED_EMBEDDING_MODELS", "a JSON list of model names")?
            .unwrap_or_else(|| vec!["text-embedding-3-small".to_owned(), "text-embedding-3-large".to_owned()]);
        if embedding_models.iter().any(String::is_empty) {
            return Err(SettingsError::new(
                "ALLOWED_EMBEDDING_MODELS",
                "holds an empty model name",
            ));
        }
        // Client-side tools only by default: hosted tools act on state the upstream keeps
        // under the product's one key, and their fees are outside any price.
        let allowed_tools: Vec<String> = self
            .json("ALLOWED_TOOLS", "a JSON list of tool types")?
            .unwrap_or_else(|| vec!["function".to_owned(), "custom".to_owned()]);
        Ok(Policy {
            allowed_models,
            max_tokens,
            default_tokens_field,
            temperature_min,
            temperature_max,
            embedding_models,
            allowed_tools,
        })
    }

    fn redis(&self) -> Result<Option<RedisSettings>, SettingsError> {
        let cluster = self.bool("REDIS_CLUSTER", false)?;
        let ca_cert = self.parse("REDIS_CA_CERT", parse_ca_cert)?;
        let prefix = self
            .string("REDIS_PREFIX")
            .unwrap_or_else(|| "api-key-server".to_owned());
        let timeout = Duration::from_millis(self.positive_int::<u64>("REDIS_TIMEOUT_MS")?.unwrap_or(100));
        let Some(url) = self.parse("REDIS_URL", |v| {
            let parsed = url::Url::parse(v).map_err(|_| "expected a redis:// or rediss:// URL".to_owned())?;
            match parsed.scheme() {
                "redis" | "rediss" if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(v.to_owned()),
                _ => Err("expected a redis:// or rediss:// URL with a host".to_owned()),
            }
        })?
        else {
            return Ok(None);
        };
        if ca_cert.is_some() && url.starts_with("redis://") {
            return Err(SettingsError::new(
                "REDIS_CA_CERT",
                format!("is set but {PREFIX}REDIS_URL does not use rediss:// (TLS)"),
            ));
        }
        Ok(Some(RedisSettings {
            url: Secret::new(url),
            cluster,
            ca_cert,
            prefix,
            timeout,
        }))
    }

    fn limits(
        &self,
        products: &HashSet<Arc<str>>,
        hmac: &HmacSettings,
    ) -> Result<(LimitSettings, budgets::Overrides), SettingsError> {
        let capacity = self
            .positive_int::<u32>("RATE_LIMIT_CAPACITY")?
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::new(10).expect("10 is not zero"));
        let refill_per_second = self
            .parse("RATE_LIMIT_REFILL_PER_SECOND", |v| {
                parse_rate(v).ok_or_else(|| "expected a number > 0".to_owned())
            })?
            .unwrap_or(5.0);
        let daily_quota = self
            .positive_int::<u64>("DAILY_QUOTA")?
            .and_then(NonZeroU64::new)
            .unwrap_or(NonZeroU64::new(200_000).expect("200000 is not zero"));
        let default = Limits {
            capacity,
            refill_per_second,
            daily_quota,
        };

        let mut budget_overrides = budgets::Overrides::default();
        let mut overrides = |name: &str, known: &dyn Fn(&str) -> bool, what: &str, source: &str| {
            let expected = if what == "product" {
                "a JSON object of id to {\"capacity\", \"refill_per_second\", \"daily_quota\", \"daily_budget_usd\", \"product_daily_budget_usd\"}"
            } else {
                "a JSON object of id to {\"capacity\", \"refill_per_second\", \"daily_quota\", \"daily_budget_usd\"}"
            };
            self.json::<HashMap<String, LimitsOverride>>(name, expected)?
                .unwrap_or_default()
                .into_iter()
                .map(|(id, entry)| {
                    check_id(name, what, &id)?;
                    if !known(&id) {
                        return Err(SettingsError::new(
                            name,
                            format!("names {what} \"{id}\", which is not in {PREFIX}{source}"),
                        ));
                    }
                    let limits = entry
                        .apply(default)
                        .map_err(|reason| SettingsError::new(name, format!("{what} \"{id}\": {reason}")))?;
                    budget_overrides
                        .add(what, &id, &entry)
                        .map_err(|reason| SettingsError::new(name, format!("{what} \"{id}\": {reason}")))?;
                    Ok((id, limits))
                })
                .collect::<Result<HashMap<_, _>, _>>()
        };
        let products = overrides(
            "PRODUCT_LIMITS",
            &|id| products.contains(id),
            "product",
            "PRODUCT_KEYS or API_KEY_SERVER_PRODUCT_UPSTREAMS",
        )?;
        let clients = overrides(
            "CLIENT_LIMITS",
            &|id| hmac.secrets.contains_key(id),
            "client",
            "CLIENT_HMAC_SECRETS",
        )?;
        let limits = LimitSettings {
            default,
            products,
            clients,
        };
        Ok((limits, budget_overrides))
    }
}

/// One entry of `PRODUCT_LIMITS` / `CLIENT_LIMITS`: any of the three limits and the budgets.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsOverride {
    capacity: Option<u64>,
    refill_per_second: Option<f64>,
    daily_quota: Option<u64>,
    /// Read from its decimal text, never as a float ([`budgets`]).
    daily_budget_usd: Option<Box<serde_json::value::RawValue>>,
    /// `PRODUCT_LIMITS` only.
    product_daily_budget_usd: Option<Box<serde_json::value::RawValue>>,
}

impl LimitsOverride {
    fn apply(&self, default: Limits) -> Result<Limits, String> {
        let capacity = match self.capacity {
            None => default.capacity,
            Some(c) => u32::try_from(c)
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or("capacity must be an integer from 1 to 4294967295")?,
        };
        let refill_per_second = match self.refill_per_second {
            None => default.refill_per_second,
            Some(r) if r.is_finite() && r > 0.0 => r,
            Some(_) => return Err("refill_per_second must be > 0".to_owned()),
        };
        let daily_quota = match self.daily_quota {
            None => default.daily_quota,
            Some(q) => NonZeroU64::new(q).ok_or("daily_quota must be > 0")?,
        };
        Ok(Limits {
            capacity,
            refill_per_second,
            daily_quota,
        })
    }
}

/// An id (a key of an id map, or a product in `CLIENT_PRODUCTS`) must be 1 to
/// [`MAX_ID_BYTES`](crate::auth::MAX_ID_BYTES) bytes, as in requests. The error does not
/// quote the id: a 400 KB one would make a 400 KB log line.
fn check_id(name: &str, what: &str, id: &str) -> Result<(), SettingsError> {
    if id.is_empty() {
        return Err(SettingsError::new(name, format!("a {what} id is empty")));
    }
    if !crate::auth::is_valid_id(id) {
        return Err(SettingsError::new(
            name,
            format!("a {what} id is longer than {} bytes", crate::auth::MAX_ID_BYTES),
        ));
    }
    Ok(())
}

/// `REDIS_CA_CERT`: PEM holding at least one certificate, each of which parses as an
/// X.509 trust anchor. Checked here because the Redis client finds out only when it
/// connects, and a Redis it cannot trust means limits and nonces in memory for good.
fn parse_ca_cert(v: &str) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(v.as_bytes()) {
        let cert = cert.map_err(|_| "expected PEM certificates".to_owned())?;
        roots
            .add(cert)
            .map_err(|_| "holds a certificate that does not parse as X.509".to_owned())?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (\"BEGIN CERTIFICATE\")".to_owned());
    }
    Ok(v.as_bytes().to_vec())
}

fn parse_rate(v: &str) -> Option<f64> {
    v.parse::<f64>().ok().filter(|r| r.is_finite() && *r > 0.0)
}

/// Seconds as an integer or a decimal ("0.5"); `zero_ok` allows 0.
fn parse_seconds(v: &str, zero_ok: bool) -> Option<Duration> {
    let s = v
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && (*s > 0.0 || (zero_ok && *s == 0.0)))?;
    Duration::try_from_secs_f64(s).ok()
}

fn parse_upstream_url(v: &str) -> Result<Uri, String> {
    let uri: Uri = v
        .parse()
        .map_err(|_| "expected an http:// or https:// URL".to_owned())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(host)) if !host.is_empty() => {}
        _ => return Err("expected an http:// or https:// URL with a host".to_owned()),
    }
    // The API base of the default upstream is this URL without `/chat/completions`.
    if !uri.path().ends_with("/chat/completions") {
        return Err("expected a URL whose path ends in /chat/completions".to_owned());
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| {
                let key = if *k == "PORT" {
                    (*k).to_owned()
                } else {
                    format!("{PREFIX}{k}")
                };
                (key, (*v).to_owned())
            })
            .collect();
        move |k| map.get(k).cloned()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("PRODUCT_KEYS", r#"{"app":"sk-test"}"#),
            ("CLIENT_HMAC_SECRETS", r#"{"desk":"0123456789abcdef0123456789abcdef"}"#),
        ]
    }

    fn error_of(extra: &[(&'static str, &'static str)]) -> SettingsError {
        let mut pairs = base();
        pairs.extend_from_slice(extra);
        Settings::from_lookup(lookup(&pairs)).expect_err("settings should be refused")
    }

    const PRICES: &str = r#"{"gpt-4o":{"input":2.5,"output":10},"gpt-4o-mini":{"input":0.15,"output":0.6},"text-embedding-3-small":{"input":0.02},"text-embedding-3-large":{"input":0.13}}"#;

    #[test]
    fn budgets_are_read_exactly_and_need_every_callable_model_priced() {
        let mut pairs = base();
        pairs.extend([
            ("MODEL_PRICES", PRICES),
            ("DAILY_BUDGET_USD", "1.5"),
            (
                "PRODUCT_LIMITS",
                r#"{"app":{"daily_budget_usd":0.25,"product_daily_budget_usd":100}}"#,
            ),
            ("CLIENT_LIMITS", r#"{"desk":{"daily_budget_usd":3}}"#),
            ("BUDGET_RESERVATION_SECONDS", "600"),
            ("BUDGET_OUTAGE_SHARE", "0.25"),
            ("DAY_TIMEZONE", "Asia/Tokyo"),
        ]);
        let settings = Settings::from_lookup(lookup(&pairs)).expect("valid settings");
        let budgets = &settings.budgets;
        assert_eq!(budgets.user_budget("app"), Some(crate::budget::Nanos(250_000_000)));
        assert_eq!(budgets.user_budget("other"), Some(crate::budget::Nanos(1_500_000_000)));
        assert_eq!(
            budgets.product_budget("app"),
            Some(crate::budget::Nanos(100_000_000_000))
        );
        assert_eq!(budgets.client_budget("desk"), Some(crate::budget::Nanos(3_000_000_000)));
        assert_eq!(budgets.reservation_ttl, Duration::from_secs(600));
        assert!(budgets.applies("app", None));
        assert_eq!(settings.day_zone.name(), "Asia/Tokyo");

        // Prices alone are no budget: nothing has to be priced.
        let mut pairs = base();
        pairs.push(("MODEL_PRICES", r#"{"gpt-4o":{"input":1}}"#));
        let settings = Settings::from_lookup(lookup(&pairs)).expect("valid settings");
        assert!(!settings.budgets.any());
    }

    #[test]
    fn malformed_budgets_stop_startup_naming_the_variable() {
        let unpriced = error_of(&[
            ("DAILY_BUDGET_USD", "1"),
            ("MODEL_PRICES", r#"{"gpt-4o":{"input":1,"output":1}}"#),
        ]);
        assert_eq!(unpriced.variable, "API_KEY_SERVER_MODEL_PRICES");
        assert!(unpriced.reason.contains("gpt-4o-mini"), "{unpriced}");
        let no_output = error_of(&[
            ("DAILY_BUDGET_USD", "1"),
            (
                "MODEL_PRICES",
                r#"{"gpt-4o":{"input":1},"gpt-4o-mini":{"input":1,"output":1},"text-embedding-3-small":{"input":1},"text-embedding-3-large":{"input":1}}"#,
            ),
        ]);
        assert!(no_output.reason.contains("output"), "{no_output}");
        let precise = error_of(&[("MODEL_PRICES", r#"{"gpt-4o":{"input":0.0000001}}"#)]);
        assert_eq!(precise.variable, "API_KEY_SERVER_MODEL_PRICES");
        for (name, value) in [
            ("DAILY_BUDGET_USD", "0"),
            ("DAILY_BUDGET_USD", "-1"),
            ("DAILY_BUDGET_USD", "0.0000001"),
            ("BUDGET_OUTAGE_SHARE", "0"),
            ("BUDGET_OUTAGE_SHARE", "1.5"),
            ("BUDGET_RESERVATION_SECONDS", "0"),
            ("DAY_TIMEZONE", "Mars/Olympus"),
        ] {
            let error = error_of(&[("MODEL_PRICES", PRICES), (name, value)]);
            assert_eq!(error.variable, format!("{PREFIX}{name}"), "{name}={value}");
            assert!(!error.reason.contains(value) || value == "0", "{error}");
        }
        let client_product_budget = error_of(&[
            ("MODEL_PRICES", PRICES),
            ("CLIENT_LIMITS", r#"{"desk":{"product_daily_budget_usd":1}}"#),
        ]);
        assert_eq!(client_product_budget.variable, "API_KEY_SERVER_CLIENT_LIMITS");
        let zero = error_of(&[
            ("MODEL_PRICES", PRICES),
            ("PRODUCT_LIMITS", r#"{"app":{"daily_budget_usd":0}}"#),
        ]);
        assert_eq!(zero.variable, "API_KEY_SERVER_PRODUCT_LIMITS");
        let text = error_of(&[
            ("MODEL_PRICES", PRICES),
            ("PRODUCT_LIMITS", r#"{"app":{"daily_budget_usd":"5"}}"#),
        ]);
        assert_eq!(text.variable, "API_KEY_SERVER_PRODUCT_LIMITS");
    }

    #[test]
    fn the_known_variables_are_exactly_those_the_parser_reads() {
        let pairs = base();
        let values = lookup(&pairs);
        let read = std::sync::Mutex::new(Vec::new());
        Settings::from_lookup(|name| {
            read.lock().expect("not poisoned").push(name.to_owned());
            values(name)
        })
        .expect("valid settings");
        let read = read.into_inner().expect("not poisoned");
        let mut prefixed: Vec<&str> = read.iter().filter_map(|n| n.strip_prefix(PREFIX)).collect();
        prefixed.sort_unstable();
        prefixed.dedup();
        let mut known = KNOWN_VARIABLES.to_vec();
        known.sort_unstable();
        assert_eq!(prefixed, known, "read by the parser vs KNOWN_VARIABLES");
        // Besides those, only the platform's own variables.
        let others: Vec<&str> = read
            .iter()
            .map(String::as_str)
            .filter(|n| !n.starts_with(PREFIX))
            .collect();
        assert!(
            others
                .iter()
                .all(|n| ["PORT", "GOOGLE_CLOUD_PROJECT", METADATA_HOST_VARIABLE].contains(n)),
            "{others:?}"
        );
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = Settings::from_lookup(lookup(&base())).expect("valid settings");
        assert_eq!(s.port, 8080);
        assert_eq!(s.policy.allowed_models, ["gpt-4o", "gpt-4o-mini"]);
        assert_eq!(s.policy.max_tokens.get(), 2048);
        assert_eq!(s.policy.default_tokens_field, TokensField::MaxTokens);
        assert_eq!(s.upstream.url, "https://api.openai.com/v1/chat/completions");
        assert_eq!(s.upstream.timeout, Duration::from_secs(120));
        assert_eq!(s.upstream.idle_timeout, Duration::from_secs(300));
        assert_eq!(s.max_body_bytes, 1_048_576);
        assert_eq!(s.client_timeout, Duration::from_secs(30));
        assert!(s.redis.is_none());
        assert_eq!(s.limits.default.capacity.get(), 10);
        assert!((s.limits.default.refill_per_second - 5.0).abs() < f64::EPSILON);
        assert_eq!(s.limits.default.daily_quota.get(), 200_000);
        assert_eq!(s.hmac.clock_tolerance, Duration::from_secs(300));
        assert!(s.hmac.require_nonce);
        assert_eq!(s.hmac.nonce_capacity, 1_000_000);
        assert_eq!(s.jwt.max_ttl, Duration::from_secs(3600));
        assert_eq!(s.jwt.leeway, Duration::from_secs(30));
        assert_eq!(s.shutdown_grace, Duration::from_secs(8));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.metrics_port, None);
    }

    #[test]
    fn debug_output_redacts_every_secret() {
        let mut pairs = base();
        pairs.push(("REDIS_URL", "redis://:hunter2-password@127.0.0.1:6379"));
        let s = Settings::from_lookup(lookup(&pairs)).expect("valid settings");
        let debug = format!("{s:?}");
        assert!(!debug.contains("sk-test"), "{debug}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert_eq!(
            s.redis.as_ref().map(RedisSettings::redacted_url).as_deref(),
            Some("redis://127.0.0.1:6379")
        );
    }

    #[test]
    fn errors_name_the_variable_and_never_the_value() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("MAX_TOKENS", "0")], "API_KEY_SERVER_MAX_TOKENS"),
            (&[("MAX_TOKENS", "abc")], "API_KEY_SERVER_MAX_TOKENS"),
            (&[("RATE_LIMIT_CAPACITY", "0")], "API_KEY_SERVER_RATE_LIMIT_CAPACITY"),
            (
                &[("RATE_LIMIT_REFILL_PER_SECOND", "0")],
                "API_KEY_SERVER_RATE_LIMIT_REFILL_PER_SECOND",
            ),
            (&[("DAILY_QUOTA", "0")], "API_KEY_SERVER_DAILY_QUOTA"),
            (&[("TEMPERATURE_RANGE", "[2, 1]")], "API_KEY_SERVER_TEMPERATURE_RANGE"),
            (&[("ALLOWED_MODELS", "[]")], "API_KEY_SERVER_ALLOWED_MODELS"),
            (
                &[("PRODUCT_LIMITS", r#"{"nope":{"capacity":1}}"#)],
                "API_KEY_SERVER_PRODUCT_LIMITS",
            ),
            (
                &[("PRODUCT_LIMITS", r#"{"app":{"burst":1}}"#)],
                "API_KEY_SERVER_PRODUCT_LIMITS",
            ),
            (
                &[("PRODUCT_LIMITS", r#"{"app":{"capacity":0}}"#)],
                "API_KEY_SERVER_PRODUCT_LIMITS",
            ),
            (
                &[("CLIENT_LIMITS", r#"{"ghost":{"capacity":1}}"#)],
                "API_KEY_SERVER_CLIENT_LIMITS",
            ),
            (
                &[("CLIENT_PRODUCTS", r#"{"ghost":["app"]}"#)],
                "API_KEY_SERVER_CLIENT_PRODUCTS",
            ),
            (
                &[("CLIENT_PRODUCTS", r#"{"desk":["nope"]}"#)],
                "API_KEY_SERVER_CLIENT_PRODUCTS",
            ),
            (&[("REDIS_URL", "http://x")], "API_KEY_SERVER_REDIS_URL"),
            (&[("LOG_FORMAT", "xml")], "API_KEY_SERVER_LOG_FORMAT"),
            (&[("PORT", "99999")], "PORT"),
        ];
        for (extra, variable) in cases {
            let error = error_of(extra);
            assert_eq!(error.variable, *variable, "{extra:?}");
        }
    }

    #[test]
    fn short_hmac_secret_is_refused_without_printing_it() {
        let pairs = [
            ("PRODUCT_KEYS", r#"{"app":"sk-test"}"#),
            ("CLIENT_HMAC_SECRETS", r#"{"desk":"short-secret-value"}"#),
        ];
        let error = Settings::from_lookup(lookup(&pairs)).expect_err("short secret");
        assert_eq!(error.variable, "API_KEY_SERVER_CLIENT_HMAC_SECRETS");
        assert!(!error.to_string().contains("short-secret-value"));
    }

    #[test]
    fn product_key_that_is_no_header_value_is_refused_without_printing_it() {
        let pairs = [
            ("PRODUCT_KEYS", "{\"app\":\"sk-\\u00e9secret\"}"),
            ("CLIENT_HMAC_SECRETS", r#"{"desk":"0123456789abcdef0123456789abcdef"}"#),
        ];
        let error = Settings::from_lookup(lookup(&pairs)).expect_err("bad key");
        assert_eq!(error.variable, "API_KEY_SERVER_PRODUCT_KEYS");
        assert!(!error.to_string().contains("secret"), "{error}");
    }

    #[test]
    fn malformed_json_error_does_not_quote_the_input() {
        let pairs = [
            ("PRODUCT_KEYS", r#"{"app": sk-live-abc}"#),
            ("CLIENT_HMAC_SECRETS", r#"{"desk":"0123456789abcdef0123456789abcdef"}"#),
        ];
        let error = Settings::from_lookup(lookup(&pairs)).expect_err("bad json");
        assert!(!error.to_string().contains("sk-live-abc"), "{error}");
    }

    #[test]
    fn requires_some_client_authentication() {
        let error = Settings::from_lookup(lookup(&[("PRODUCT_KEYS", r#"{"app":"k"}"#)])).expect_err("no auth");
        assert_eq!(error.variable, "API_KEY_SERVER_JWT_PUBLIC_KEYS");
    }

    #[test]
    fn product_limits_override_only_the_fields_they_name() {
        let mut pairs = base();
        pairs.push(("PRODUCT_LIMITS", r#"{"app":{"capacity":3}}"#));
        let s = Settings::from_lookup(lookup(&pairs)).expect("valid");
        let limits = s.limits.for_product("app");
        assert_eq!(limits.capacity.get(), 3);
        assert_eq!(limits.daily_quota.get(), 200_000);
    }

    #[test]
    fn ids_of_256_bytes_are_accepted_and_longer_ones_refused_unquoted() {
        let id = "i".repeat(256);
        let keys = format!(r#"{{"{id}":"sk-test"}}"#);
        let limits = format!(r#"{{"{id}":{{"capacity":1}}}}"#);
        let pairs = [
            ("PRODUCT_KEYS", keys.as_str()),
            ("CLIENT_HMAC_SECRETS", r#"{"desk":"0123456789abcdef0123456789abcdef"}"#),
            ("PRODUCT_LIMITS", limits.as_str()),
        ];
        let s = Settings::from_lookup(lookup(&pairs)).expect("256-byte ids are valid");
        assert_eq!(s.limits.for_product(&id).capacity.get(), 1);
        let long = "i".repeat(257);
        let keys = format!(r#"{{"{long}":"sk-test"}}"#);
        let pairs = [
            ("PRODUCT_KEYS", keys.as_str()),
            ("CLIENT_HMAC_SECRETS", r#"{"desk":"0123456789abcdef0123456789abcdef"}"#),
        ];
        let error = Settings::from_lookup(lookup(&pairs)).expect_err("a 257-byte id is refused");
        assert_eq!(error.variable, "API_KEY_SERVER_PRODUCT_KEYS");
        assert!(!error.to_string().contains(&long), "{error}");
    }

    #[test]
    fn ca_cert_with_plain_redis_url_is_an_error() {
        let error = error_of(&[
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            (
                "REDIS_CA_CERT",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ),
        ]);
        assert!(error.variable.starts_with("API_KEY_SERVER_REDIS_"), "{error}");
    }
}
