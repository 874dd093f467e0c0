//! JWT authentication over real HTTP: every rule and attack of the contract's
//! "Authentication" and "JWT (RS256)" sections.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use api_key_server::clock::ManualClock;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{CHAT, KID, MockUpstream, PRODUCT, PRODUCT_KEY, TestApp, USER, fixture, jwt, jwt_claims, now, sign_jwt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

async fn start(overrides: &[(&str, &str)]) -> (MockUpstream, TestApp) {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), overrides).await;
    (upstream, app)
}

async fn with_token(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {token}"))
        .body(CHAT)
        .send()
        .await
        .unwrap()
}

/// The response is the contract's 401 with `code`, in the envelope, not to be retried.
async fn assert_401(response: reqwest::Response, code: &str) {
    assert_eq!(response.status(), 401, "expected 401 {code}");
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (kind, actual, _) = common::error_of(response).await;
    assert_eq!(kind, "authentication_error");
    assert_eq!(actual, code);
}

async fn assert_invalid(app: &TestApp, token: &str) {
    assert_401(with_token(app, token).await, "invalid_token").await;
}

fn claims() -> Value {
    let now = now();
    json!({"sub": USER, "product": PRODUCT, "iat": now, "exp": now + 300})
}

fn header(alg: Algorithm, kid: Option<&str>) -> Header {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    header
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A token from a raw header and payload with the given signature segment.
fn raw_token(header: &Value, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", b64(header), b64(claims))
}

#[tokio::test]
async fn a_valid_token_reaches_the_upstream_with_the_product_key() {
    let (upstream, app) = start(&[]).await;
    let response = with_token(&app, &jwt(PRODUCT, USER)).await;
    assert_eq!(response.status(), 200);
    let received = upstream.last();
    assert_eq!(
        received.headers["authorization"],
        format!("Bearer {PRODUCT_KEY}").as_str()
    );
    app.shutdown().await;
}

#[tokio::test]
async fn the_same_token_works_for_many_requests() {
    let (_upstream, app) = start(&[]).await;
    let token = jwt(PRODUCT, USER);
    for _ in 0..5 {
        assert_eq!(with_token(&app, &token).await.status(), 200);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_alg_none() {
    let (upstream, app) = start(&[]).await;
    for alg in ["none", "None", "NONE"] {
        let token = raw_token(&json!({"alg": alg, "typ": "JWT", "kid": KID}), &claims(), "");
        assert_invalid(&app, &token).await;
    }
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_hs256_signed_with_the_public_key_as_secret() {
    let (upstream, app) = start(&[]).await;
    let public_pem = fixture("jwt-public.pem");
    for secret in [public_pem.as_bytes(), public_pem.trim().as_bytes()] {
        let token = jsonwebtoken::encode(
            &header(Algorithm::HS256, Some(KID)),
            &claims(),
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        assert_invalid(&app, &token).await;
    }
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_rs512_even_with_the_right_key() {
    let (_upstream, app) = start(&[]).await;
    let token = sign_jwt(&header(Algorithm::RS512, Some(KID)), &claims(), "jwt-private.pem");
    assert_invalid(&app, &token).await;
    let token = sign_jwt(&header(Algorithm::PS256, Some(KID)), &claims(), "jwt-private.pem");
    assert_invalid(&app, &token).await;
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_es256() {
    let (_upstream, app) = start(&[]).await;
    let key = EncodingKey::from_ec_pem(fixture("ec-private.pem").as_bytes()).unwrap();
    let token = jsonwebtoken::encode(&header(Algorithm::ES256, Some(KID)), &claims(), &key).unwrap();
    assert_invalid(&app, &token).await;
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_an_rs256_header_over_another_algorithms_signature() {
    let (_upstream, app) = start(&[]).await;
    // An HS256 signature relabelled as RS256.
    let hs = jsonwebtoken::encode(
        &header(Algorithm::HS256, Some(KID)),
        &claims(),
        &EncodingKey::from_secret(fixture("jwt-public.pem").as_bytes()),
    )
    .unwrap();
    let signature = hs.rsplit('.').next().unwrap();
    let token = raw_token(&json!({"alg": "RS256", "typ": "JWT", "kid": KID}), &claims(), signature);
    assert_invalid(&app, &token).await;
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_a_missing_or_unknown_kid() {
    let (_upstream, app) = start(&[]).await;
    assert_invalid(
        &app,
        &sign_jwt(&header(Algorithm::RS256, None), &claims(), "jwt-private.pem"),
    )
    .await;
    assert_invalid(
        &app,
        &sign_jwt(
            &header(Algorithm::RS256, Some("other-kid")),
            &claims(),
            "jwt-private.pem",
        ),
    )
    .await;
    assert_invalid(
        &app,
        &sign_jwt(&header(Algorithm::RS256, Some("")), &claims(), "jwt-private.pem"),
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_a_tampered_payload() {
    let (_upstream, app) = start(&[]).await;
    let token = jwt(PRODUCT, USER);
    let parts: Vec<&str> = token.split('.').collect();
    let mut forged = claims();
    forged["sub"] = json!("mallory");
    let tampered = format!("{}.{}.{}", parts[0], b64(&forged), parts[2]);
    assert_invalid(&app, &tampered).await;
    // Flipping one signature character is refused too.
    let mut signature = parts[2].to_owned();
    let last = if signature.ends_with('A') { "B" } else { "A" };
    signature.replace_range(signature.len() - 1.., last);
    assert_invalid(&app, &format!("{}.{}.{signature}", parts[0], parts[1])).await;
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_a_token_signed_with_another_key() {
    let (_upstream, app) = start(&[]).await;
    let token = sign_jwt(&header(Algorithm::RS256, Some(KID)), &claims(), "other-private.pem");
    assert_invalid(&app, &token).await;
    app.shutdown().await;
}

#[tokio::test]
async fn rejects_malformed_tokens() {
    let (_upstream, app) = start(&[]).await;
    for token in ["abc", "a.b", "a.b.c", "...", "a.b.c.d", "\u{e9}.b.c"] {
        let response = app
            .client
            .post(app.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {token}").into_bytes())
            .body(CHAT)
            .send()
            .await;
        // A header reqwest cannot send is not a test of the proxy.
        if let Ok(response) = response {
            assert_401(response, "invalid_token").await;
        }
    }
    app.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_token_expired() {
    let (_upstream, app) = start(&[]).await;
    let now = now();
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now - 600, "exp": now - 31}));
    assert_401(with_token(&app, &token).await, "token_expired").await;
    app.shutdown().await;
}

#[tokio::test]
async fn expiry_within_the_leeway_is_accepted() {
    let (_upstream, app) = start(&[]).await;
    let now = now();
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now - 600, "exp": now - 10}));
    assert_eq!(with_token(&app, &token).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn a_cached_token_still_expires() {
    let upstream = MockUpstream::openai().await;
    // On a whole second, so that `exp` falls exactly on a reading of the clock.
    let now = now();
    let clock = ManualClock::at(std::time::Duration::from_secs(now));
    let app = TestApp::spawn_with_clock(&upstream.url(), &[("JWT_LEEWAY_SECONDS", "0")], clock.clock()).await;
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now, "exp": now + 2}));
    assert_eq!(with_token(&app, &token).await.status(), 200);
    clock.advance(std::time::Duration::from_secs(2));
    assert_eq!(
        with_token(&app, &token).await.status(),
        200,
        "exp itself is still valid"
    );
    clock.advance(std::time::Duration::from_millis(1));
    assert_401(with_token(&app, &token).await, "token_expired").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_lifetime_over_the_maximum_ttl_is_refused() {
    let (_upstream, app) = start(&[]).await;
    let now = now();
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now, "exp": now + 3601}));
    assert_invalid(&app, &token).await;
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now, "exp": now + 3600}));
    assert_eq!(with_token(&app, &token).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn the_maximum_ttl_is_configurable() {
    let (_upstream, app) = start(&[("JWT_MAX_TTL_SECONDS", "60")]).await;
    let now = now();
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now, "exp": now + 61}));
    assert_invalid(&app, &token).await;
    app.shutdown().await;
}

#[tokio::test]
async fn iat_in_the_future_is_refused() {
    let (_upstream, app) = start(&[]).await;
    let now = now();
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now + 120, "exp": now + 300}));
    assert_invalid(&app, &token).await;
    // Within the leeway, clocks may differ.
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now + 10, "exp": now + 300}));
    assert_eq!(with_token(&app, &token).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn nbf_in_the_future_is_refused_and_nbf_in_the_past_accepted() {
    let (_upstream, app) = start(&[]).await;
    let now = now();
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now, "exp": now + 300, "nbf": now + 120}));
    assert_invalid(&app, &token).await;
    let token = jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now, "exp": now + 300, "nbf": now - 5}));
    assert_eq!(with_token(&app, &token).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
#[allow(clippy::cast_precision_loss)] // unix seconds fit an f64 exactly
async fn fractional_exp_and_iat_are_accepted() {
    let (_upstream, app) = start(&[]).await;
    let now = now() as f64;
    let token =
        jwt_claims(&json!({"sub": USER, "product": PRODUCT, "iat": now - 0.25, "exp": now + 299.75, "nbf": now - 1.5}));
    assert_eq!(with_token(&app, &token).await.status(), 200);
    // Exponent notation is a JSON number too (`1.795e9`), as some libraries write them.
    let now = now / 1e9;
    let payload = format!(
        r#"{{"sub":"{USER}","product":"{PRODUCT}","iat":{now:.9}e9,"exp":{:.9}e9}}"#,
        now + 3e-7
    );
    let payload = serde_json::value::RawValue::from_string(payload).unwrap();
    let key = EncodingKey::from_rsa_pem(fixture("jwt-private.pem").as_bytes()).unwrap();
    let token = jsonwebtoken::encode(&header(Algorithm::RS256, Some(KID)), &payload, &key).unwrap();
    assert!(
        String::from_utf8(URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap())
            .unwrap()
            .contains("e9")
    );
    assert_eq!(with_token(&app, &token).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn every_required_claim_must_be_present() {
    let (_upstream, app) = start(&[]).await;
    for missing in ["sub", "product", "exp", "iat"] {
        let mut claims = claims();
        claims.as_object_mut().unwrap().remove(missing);
        assert_invalid(&app, &jwt_claims(&claims)).await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn claims_of_the_wrong_type_are_refused() {
    let (_upstream, app) = start(&[]).await;
    let now = now();
    for (name, value) in [
        ("sub", json!("")),
        ("sub", json!(42)),
        ("product", json!(["demo"])),
        ("exp", json!((now + 300).to_string())),
        ("iat", json!(null)),
    ] {
        let mut claims = claims();
        claims[name] = value;
        assert_invalid(&app, &jwt_claims(&claims)).await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let (_upstream, app) = start(&[
        ("JWT_ISSUER", "https://backend.example"),
        ("JWT_AUDIENCE", "api-key-server"),
    ])
    .await;
    let with = |iss: Option<&str>, aud: Option<Value>| {
        let mut claims = claims();
        if let Some(iss) = iss {
            claims["iss"] = json!(iss);
        }
        if let Some(aud) = aud {
            claims["aud"] = aud;
        }
        jwt_claims(&claims)
    };
    let good = with(Some("https://backend.example"), Some(json!("api-key-server")));
    assert_eq!(with_token(&app, &good).await.status(), 200);
    let in_list = with(
        Some("https://backend.example"),
        Some(json!(["other", "api-key-server"])),
    );
    assert_eq!(with_token(&app, &in_list).await.status(), 200);
    assert_invalid(&app, &with(Some("https://evil.example"), Some(json!("api-key-server")))).await;
    assert_invalid(&app, &with(Some("https://backend.example"), Some(json!("other")))).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_configured_issuer_is_required() {
    let (_upstream, app) = start(&[("JWT_ISSUER", "https://backend.example")]).await;
    // Contract settings table: `JWT_ISSUER` / `JWT_AUDIENCE`: "required `iss` / `aud` when set".
    assert_invalid(&app, &jwt_claims(&claims())).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_configured_audience_is_required() {
    let (_upstream, app) = start(&[("JWT_AUDIENCE", "api-key-server")]).await;
    assert_invalid(&app, &jwt_claims(&claims())).await;
    app.shutdown().await;
}

#[tokio::test]
async fn issuer_and_audience_are_ignored_when_not_configured() {
    let (_upstream, app) = start(&[]).await;
    let mut claims = claims();
    claims["iss"] = json!("anyone");
    claims["aud"] = json!("anything");
    assert_eq!(with_token(&app, &jwt_claims(&claims)).await.status(), 200);
    app.shutdown().await;
}

/// A listener on 127.0.0.1 that counts the connections it gets.
async fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/keys.json", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (url, count)
}

#[tokio::test]
async fn jku_and_x5u_in_the_header_are_never_fetched() {
    let (_upstream, app) = start(&[]).await;
    let (url, connections) = counting_listener().await;
    let mut other = header(Algorithm::RS256, Some(KID));
    other.jku = Some(url.clone());
    other.x5u = Some(url.clone());
    let forged = sign_jwt(&other, &claims(), "other-private.pem");
    assert_invalid(&app, &forged).await;
    // With the right key the token is valid; the URLs are still not used.
    let genuine = sign_jwt(&other, &claims(), "jwt-private.pem");
    assert_eq!(with_token(&app, &genuine).await.status(), 200);
    // A kid-less token pointing at keys elsewhere.
    let mut kidless = header(Algorithm::RS256, None);
    kidless.jku = Some(url);
    assert_invalid(&app, &sign_jwt(&kidless, &claims(), "other-private.pem")).await;
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn an_embedded_jwk_is_not_used() {
    let (_upstream, app) = start(&[]).await;
    // The attacker's own key, embedded: the signature is checked with the configured key.
    let mut forged = serde_json::to_value(header(Algorithm::RS256, Some(KID))).unwrap();
    forged["jwk"] = json!({"kty": "RSA", "n": "sXch", "e": "AQAB"});
    let signed = sign_jwt(&header(Algorithm::RS256, Some(KID)), &claims(), "other-private.pem");
    let signature = signed.rsplit('.').next().unwrap();
    assert_invalid(&app, &raw_token(&forged, &claims(), signature)).await;
    app.shutdown().await;
}

#[tokio::test]
async fn an_unknown_product_is_403() {
    let (upstream, app) = start(&[]).await;
    let response = with_token(&app, &jwt("unknown-product", USER)).await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (kind, code, _) = common::error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("permission_error", "product_not_allowed")
    );
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_second_authorization_header_is_401() {
    let (_upstream, app) = start(&[]).await;
    let token = jwt(PRODUCT, USER);
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-should-retry"], "false");
    app.shutdown().await;
}

#[tokio::test]
async fn a_scheme_other_than_bearer_is_401() {
    let (_upstream, app) = start(&[]).await;
    let token = jwt(PRODUCT, USER);
    for value in [
        format!("Basic {token}"),
        format!("Token {token}"),
        token.clone(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
    ] {
        let response = app
            .client
            .post(app.url("/v1/chat/completions"))
            .header("authorization", value)
            .body(CHAT)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["x-should-retry"], "false");
        let (kind, _, _) = common::error_of(response).await;
        assert_eq!(kind, "authentication_error");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn an_oversized_token_is_refused() {
    let (_upstream, app) = start(&[]).await;
    let mut claims = claims();
    claims["padding"] = json!("x".repeat(64 * 1024));
    // Validly signed: only its size is wrong.
    assert_invalid(&app, &jwt_claims(&claims)).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_pkcs1_public_key_works() {
    let upstream = MockUpstream::openai().await;
    let keys = json!({ KID: fixture("jwt-public-pkcs1.pem") }).to_string();
    let app = TestApp::spawn(&upstream.url(), &[("JWT_PUBLIC_KEYS", &keys)]).await;
    assert!(fixture("jwt-public-pkcs1.pem").starts_with("-----BEGIN RSA PUBLIC KEY-----"));
    assert_eq!(with_token(&app, &jwt(PRODUCT, USER)).await.status(), 200);
    assert_invalid(
        &app,
        &sign_jwt(&header(Algorithm::RS256, Some(KID)), &claims(), "other-private.pem"),
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn both_credentials_are_ambiguous() {
    let (upstream, app) = start(&[]).await;
    let signed = common::Signed::chat(CHAT.as_bytes());
    let request = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt(PRODUCT, USER))
        .body(CHAT);
    assert_401(signed.apply(request).send().await.unwrap(), "ambiguous_credentials").await;
    // `X-Signature` alone makes the request an HMAC one.
    let request = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(jwt(PRODUCT, USER))
        .header("x-signature", "00");
    assert_401(request.body(CHAT).send().await.unwrap(), "ambiguous_credentials").await;
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn no_credentials_are_missing_credentials() {
    let (_upstream, app) = start(&[]).await;
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_401(response, "missing_credentials").await;
    let response = app.client.get(app.url("/v1/models")).send().await.unwrap();
    assert_401(response, "missing_credentials").await;
    app.shutdown().await;
}

#[tokio::test]
async fn cloud_run_and_proxy_credentials_are_never_read() {
    let (upstream, app) = start(&[]).await;
    let token = format!("Bearer {}", jwt(PRODUCT, USER));
    for name in ["x-serverless-authorization", "proxy-authorization"] {
        let response = app
            .client
            .post(app.url("/v1/chat/completions"))
            .header(name, &token)
            .body(CHAT)
            .send()
            .await
            .unwrap();
        assert_401(response, "missing_credentials").await;
    }
    // Next to a real JWT they are neither a second credential nor forwarded.
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("authorization", &token)
        .header("x-serverless-authorization", "Bearer google-id-token")
        .header("proxy-authorization", "Basic cHJveHk6cGFzcw==")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = upstream.last();
    assert!(!received.headers.contains_key("x-serverless-authorization"));
    assert!(!received.headers.contains_key("proxy-authorization"));
    app.shutdown().await;
}

#[tokio::test]
async fn models_need_a_valid_token_too() {
    let (_upstream, app) = start(&[]).await;
    let ok = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(jwt(PRODUCT, USER))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let forged = sign_jwt(&header(Algorithm::RS256, Some(KID)), &claims(), "other-private.pem");
    let response = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(forged)
        .send()
        .await
        .unwrap();
    assert_401(response, "invalid_token").await;
    app.shutdown().await;
}

#[tokio::test]
async fn ids_are_1_to_256_bytes() {
    let (upstream, app) = start(&[]).await;
    let now = now();
    let token =
        |sub: &str, product: &str| jwt_claims(&json!({"sub": sub, "product": product, "iat": now, "exp": now + 300}));
    let at_bound = "u".repeat(256);
    assert_eq!(with_token(&app, &token(&at_bound, PRODUCT)).await.status(), 200);
    assert_eq!(upstream.requests().len(), 1);
    assert_invalid(&app, &token(&"u".repeat(257), PRODUCT)).await;
    assert_invalid(&app, &token("", PRODUCT)).await;
    // A product id past the bound is malformed (401), not merely unknown (403).
    assert_invalid(&app, &token(USER, &"p".repeat(257))).await;
    assert_eq!(upstream.requests().len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn claims_that_are_not_a_json_object_are_refused() {
    let (upstream, app) = start(&[]).await;
    let now = now();
    // serde reads an array as a struct's fields in order: the one shape that would pass.
    let array = json!([USER, PRODUCT, now + 300, now, null]);
    for claims in [array, json!("alice"), json!(42), json!(null)] {
        assert_invalid(&app, &jwt_claims(&claims)).await;
    }
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

/// A token whose header is exactly `header` (JSON text), validly signed with the test key.
fn token_with_raw_header(header: &Value, claims: &Value) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let key = EncodingKey::from_rsa_pem(fixture("jwt-private.pem").as_bytes()).unwrap();
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::RS256).unwrap();
    format!("{message}.{signature}")
}

#[tokio::test]
async fn a_header_with_crit_is_refused() {
    let (upstream, app) = start(&[]).await;
    // The same header without `crit` passes: the refusal is for `crit` alone.
    let plain = json!({"alg": "RS256", "typ": "JWT", "kid": KID});
    assert_eq!(
        with_token(&app, &token_with_raw_header(&plain, &claims()))
            .await
            .status(),
        200
    );
    for crit in [json!(["exp"]), json!(["b64"]), json!([]), json!(null)] {
        let mut header = plain.clone();
        header["crit"] = crit;
        if header["crit"] == json!(["b64"]) {
            header["b64"] = json!(true);
        }
        assert_invalid(&app, &token_with_raw_header(&header, &claims())).await;
    }
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KID.to_owned());
    header.crit = Some(vec!["exp".to_owned()]);
    assert_invalid(&app, &sign_jwt(&header, &claims(), "jwt-private.pem")).await;
    // A header that is not a JSON object at all.
    assert_invalid(&app, &token_with_raw_header(&json!(["RS256", KID]), &claims())).await;
    assert_eq!(upstream.requests().len(), 1);
    app.shutdown().await;
}
