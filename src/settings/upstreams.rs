//! `PRODUCT_UPSTREAMS` and `GCE_METADATA_HOST`: the products that have an upstream of their
//! own (Azure OpenAI, another OpenAI-compatible provider, Vertex AI), and where the
//! instance's Google access token comes from.
//!
//! Everything is checked here, at startup, so that the request path never meets a URL it
//! cannot use or a Google token bound for a host outside `*.googleapis.com`. Errors name
//! the variable and the product, never a value (a URL may carry a secret).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::Uri;
use http::uri::Authority;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Env, Policy, Settings, SettingsError};

/// Google's libraries read the metadata server's `host[:port]` from this variable.
pub const METADATA_HOST_VARIABLE: &str = "GCE_METADATA_HOST";
const UPSTREAMS: &str = "PRODUCT_UPSTREAMS";

/// How the proxy authenticates to a product's upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// `Authorization: Bearer <PRODUCT_KEYS[p]>` (OpenAI and most compatible providers).
    Bearer,
    /// `api-key: <PRODUCT_KEYS[p]>` and no `Authorization` (Azure OpenAI).
    ApiKey,
    /// `Authorization: Bearer <access token>` of the instance's service account, from the
    /// metadata server (Vertex AI).
    Google,
}

/// One product's own upstream: `PRODUCT_UPSTREAMS[p]`.
#[derive(Debug, Clone)]
pub struct ProductUpstream {
    /// `https://` (or `http://` on loopback), with a host, without a query string; its
    /// path has no trailing `/`, so that the client's path after `/v1` appends to it.
    pub base_url: Uri,
    pub auth: UpstreamAuth,
    /// The product's chat models, in place of `ALLOWED_MODELS`.
    pub models: Option<Vec<String>>,
    /// The product's embedding models, in place of `ALLOWED_EMBEDDING_MODELS`.
    pub embedding_models: Option<Vec<String>>,
    /// `false`: chat streams are not asked for usage (`stream_options`), for providers
    /// that refuse it.
    pub stream_usage: bool,
}

/// The metadata server's authority (`host[:port]`), `metadata.google.internal` unless
/// `GCE_METADATA_HOST` says otherwise. Spoken to in plain HTTP, as Google's libraries do:
/// it is reachable only from inside the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataHost(pub Authority);

impl Default for MetadataHost {
    fn default() -> Self {
        Self(Authority::from_static("metadata.google.internal"))
    }
}

impl Settings {
    /// The request rules of `product`: its upstream's `models` when it names some, else
    /// the default ones.
    pub fn policy_for(&self, product: &str) -> &Policy {
        self.product_policies.get(product).unwrap_or(&self.policy)
    }

    /// Whether `product`'s chat streams may be asked for usage (`stream_usage`).
    pub fn stream_usage(&self, product: &str) -> bool {
        self.product_upstreams.get(product).is_none_or(|u| u.stream_usage)
    }

    /// `product`'s own embedding models, if its upstream names some.
    pub fn embedding_models(&self, product: &str) -> Option<&[String]> {
        self.product_upstreams.get(product)?.embedding_models.as_deref()
    }
}

/// [`Policy`] per product whose upstream names its own `models`.
pub(super) fn product_policies(
    policy: &Policy,
    upstreams: &HashMap<Arc<str>, ProductUpstream>,
) -> HashMap<Arc<str>, Policy> {
    upstreams
        .iter()
        .filter(|(_, upstream)| upstream.models.is_some() || upstream.embedding_models.is_some())
        .map(|(product, upstream)| {
            let policy = Policy {
                allowed_models: upstream.models.clone().unwrap_or_else(|| policy.allowed_models.clone()),
                embedding_models: (upstream.embedding_models.clone())
                    .unwrap_or_else(|| policy.embedding_models.clone()),
                ..policy.clone()
            };
            (Arc::clone(product), policy)
        })
        .collect()
}

/// One entry as written: every field optional here, so that each rule gives its own
/// message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    base_url: Option<String>,
    auth: Option<String>,
    models: Option<Vec<String>>,
    embedding_models: Option<Vec<String>>,
    stream_usage: Option<bool>,
}

impl Env<'_> {
    pub(super) fn product_upstreams(&self) -> Result<HashMap<Arc<str>, ProductUpstream>, SettingsError> {
        let raw: HashMap<String, Box<RawValue>> = self
            .json(UPSTREAMS, "a JSON object of product id to upstream")?
            .unwrap_or_default();
        raw.into_iter()
            .map(|(product, entry)| {
                super::check_id(UPSTREAMS, "product", &product)?;
                let upstream = parse_entry(entry.get())
                    .map_err(|reason| SettingsError::new(UPSTREAMS, format!("product \"{product}\": {reason}")))?;
                Ok((Arc::from(product), upstream))
            })
            .collect()
    }

    pub(super) fn metadata_host(&self) -> Result<MetadataHost, SettingsError> {
        (self.lookup)(METADATA_HOST_VARIABLE)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<Authority>()
                    .ok()
                    .filter(|a| !a.host().is_empty() && !a.as_str().contains('@'))
                    .map(MetadataHost)
                    .ok_or_else(|| SettingsError::new(METADATA_HOST_VARIABLE, "expected host or host:port"))
            })
            .transpose()
            .map(Option::unwrap_or_default)
    }
}

fn parse_entry(json: &str) -> Result<ProductUpstream, String> {
    // serde's messages may quote the input: say only where it went wrong.
    let entry: Entry = serde_json::from_str(json).map_err(|e| {
        format!(
            "expected an object of \"base_url\", \"auth\", \"models\", \"embedding_models\", \"stream_usage\" \
             (unknown field or wrong type at line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let auth = match entry.auth.as_deref() {
        None | Some("bearer") => UpstreamAuth::Bearer,
        Some("api-key") => UpstreamAuth::ApiKey,
        Some("google") => UpstreamAuth::Google,
        Some(_) => return Err("auth must be \"bearer\", \"api-key\" or \"google\"".to_owned()),
    };
    let base_url = parse_base_url(entry.base_url.as_deref().ok_or("base_url is required")?, auth)?;
    for (field, list) in [("models", &entry.models), ("embedding_models", &entry.embedding_models)] {
        if list
            .as_ref()
            .is_some_and(|l| l.is_empty() || l.iter().any(String::is_empty))
        {
            return Err(format!("{field} must list at least one non-empty model name"));
        }
    }
    Ok(ProductUpstream {
        base_url,
        auth,
        models: entry.models,
        embedding_models: entry.embedding_models,
        stream_usage: entry.stream_usage.unwrap_or(true),
    })
}

/// `https://` anywhere, plain `http://` only on loopback; no query, no user info; for
/// `auth: google`, a host under `.googleapis.com` (or loopback, for tests and emulators).
fn parse_base_url(v: &str, auth: UpstreamAuth) -> Result<Uri, String> {
    let uri: Uri = v.trim().parse().map_err(|_| "base_url is not a URL".to_owned())?;
    let Some(authority) = uri.authority() else {
        return Err("base_url must be an https:// URL with a host".to_owned());
    };
    let host = authority.host();
    if host.is_empty() || authority.as_str().contains('@') {
        return Err("base_url must have a host and no user info".to_owned());
    }
    let loopback = is_loopback(host);
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if loopback => {}
        Some("http") => return Err("base_url must be https:// (plain http:// only on loopback)".to_owned()),
        _ => return Err("base_url must be an https:// URL".to_owned()),
    }
    if uri.query().is_some() || v.contains('?') {
        return Err("base_url must not have a query string".to_owned());
    }
    if auth == UpstreamAuth::Google && !loopback && !is_googleapis(host) {
        return Err(
            "auth \"google\" sends the instance's Google token, so base_url must be under .googleapis.com".to_owned(),
        );
    }
    // A trailing `/` is ignored: the client's path after `/v1` starts with one.
    let path = uri.path().strip_suffix('/').unwrap_or(uri.path());
    let rebuilt = format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("https"));
    rebuilt.parse().map_err(|_| "base_url is not a URL".to_owned())
}

/// `127.0.0.0/8`, `[::1]` or `localhost`.
pub(crate) fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A host name under `.googleapis.com` (not the bare domain).
pub(crate) fn is_googleapis(host: &str) -> bool {
    const SUFFIX: &str = ".googleapis.com";
    host.len() > SUFFIX.len()
        && host.is_char_boundary(host.len() - SUFFIX.len())
        && host[host.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ProductUpstream, String> {
        parse_entry(json)
    }

    #[test]
    fn a_trailing_slash_is_dropped_and_defaults_apply() {
        let u = parse(r#"{"base_url":"https://r.openai.azure.com/openai/v1/"}"#).expect("valid");
        assert_eq!(u.base_url, "https://r.openai.azure.com/openai/v1");
        assert_eq!(u.auth, UpstreamAuth::Bearer);
        assert!(u.stream_usage);
        assert!(u.models.is_none());
    }

    #[test]
    fn google_needs_googleapis_or_loopback() {
        let google = |url: &str| parse(&format!(r#"{{"base_url":"{url}","auth":"google"}}"#));
        assert!(
            google("https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/l/endpoints/openapi").is_ok()
        );
        assert!(google("http://127.0.0.1:9/v1").is_ok());
        assert!(google("http://[::1]:9/v1").is_ok());
        assert!(google("http://localhost:9/v1").is_ok());
        for bad in [
            "https://googleapis.com/v1",
            "https://evil.com/x.googleapis.com",
            "https://x.googleapis.com.evil.com/v1",
            "https://api.openai.com/v1",
        ] {
            assert!(google(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refused_entries() {
        for bad in [
            r#"{"base_url":"http://api.example.com/v1"}"#,
            r#"{"base_url":"https://api.example.com/v1?api-version=1"}"#,
            r#"{"base_url":"https://api.example.com/v1?"}"#,
            r#"{"base_url":"ftp://api.example.com/v1"}"#,
            r#"{"base_url":"https://user:pw@api.example.com/v1"}"#,
            r#"{"base_url":"https://api.example.com/v1","auth":"basic"}"#,
            r#"{"base_url":"https://api.example.com/v1","models":[]}"#,
            r#"{"base_url":"https://api.example.com/v1","embedding_models":[]}"#,
            r#"{"base_url":"https://api.example.com/v1","extra":1}"#,
            r#"{"base_url":"https://api.example.com/v1","stream_usage":"no"}"#,
            r#"{"auth":"bearer"}"#,
            r#"{"base_url":"http://128.0.0.1/v1"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .chain([(
                "API_KEY_SERVER_CLIENT_HMAC_SECRETS".to_owned(),
                r#"{"desk":"0123456789abcdef0123456789abcdef"}"#.to_owned(),
            )])
            .collect();
        Settings::from_lookup(move |k| map.get(k).cloned())
    }

    const VERTEX: &str = r#"{"gemini":{"base_url":"https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/endpoints/openapi","auth":"google","models":["google/gemini-2.5-flash"],"stream_usage":false}}"#;

    #[test]
    fn google_only_products_need_no_keys_and_have_their_own_rules() {
        let s = settings(&[("API_KEY_SERVER_PRODUCT_UPSTREAMS", VERTEX)]).expect("valid");
        assert!(s.product_keys.is_empty());
        assert!(s.products.contains("gemini"));
        assert_eq!(s.policy_for("gemini").allowed_models, ["google/gemini-2.5-flash"]);
        assert_eq!(s.policy_for("other").allowed_models, ["gpt-4o", "gpt-4o-mini"]);
        assert!(!s.stream_usage("gemini"));
        assert!(s.stream_usage("other"));
        assert_eq!(s.embedding_models("gemini"), None);
        assert_eq!(s.metadata_host, MetadataHost::default());
    }

    #[test]
    fn metadata_host_comes_from_gce_metadata_host() {
        let s = settings(&[
            ("API_KEY_SERVER_PRODUCT_UPSTREAMS", VERTEX),
            ("GCE_METADATA_HOST", "127.0.0.1:8181"),
        ])
        .expect("valid");
        assert_eq!(s.metadata_host.0.as_str(), "127.0.0.1:8181");
        let error = settings(&[
            ("API_KEY_SERVER_PRODUCT_UPSTREAMS", VERTEX),
            ("GCE_METADATA_HOST", "http://x/y"),
        ])
        .expect_err("not an authority");
        assert_eq!(error.variable, "GCE_METADATA_HOST");
    }

    #[test]
    fn a_keyed_product_still_needs_product_keys() {
        let error = settings(&[(
            "API_KEY_SERVER_PRODUCT_UPSTREAMS",
            r#"{"lab":{"base_url":"https://api.example.com/v1"}}"#,
        )])
        .expect_err("no key for lab");
        assert_eq!(error.variable, "API_KEY_SERVER_PRODUCT_KEYS");
        assert!(error.reason.contains("\"lab\""), "{error}");
    }

    #[test]
    fn loopback_hosts() {
        for host in ["127.0.0.1", "127.255.0.9", "[::1]", "LOCALHOST"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["128.0.0.1", "localhost.example.com", "[::2]", "0.0.0.0"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
