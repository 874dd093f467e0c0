//! HMAC authentication over real HTTP: the contract's "HMAC-SHA256 + timestamp" rules,
//! replay protection included.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::{
    CHAT, CLIENT, HMAC_SECRET, MockUpstream, PRODUCT, PRODUCT_KEY, Signed, TestApp, USER, hmac_sign, nonce, now,
};

const PATH: &str = "/v1/chat/completions";

async fn start(overrides: &[(&str, &str)]) -> (MockUpstream, TestApp) {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), overrides).await;
    (upstream, app)
}

async fn send(app: &TestApp, signed: &Signed, body: &str) -> reqwest::Response {
    let request = app.client.post(app.url(PATH)).body(body.to_owned());
    signed.apply(request).send().await.unwrap()
}

/// Signed as `desk` for (demo, alice) now, with `nonce`.
fn signed_with(nonce: Option<&str>, body: &str) -> Signed {
    hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        CLIENT,
        PRODUCT,
        USER,
        nonce,
        now(),
        body.as_bytes(),
    )
}

async fn assert_401(response: reqwest::Response, code: &str) {
    assert_eq!(response.status(), 401, "expected 401 {code}");
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (kind, actual, _) = common::error_of(response).await;
    assert_eq!(kind, "authentication_error");
    assert_eq!(actual, code);
}

/// A 401 in the envelope whatever its code (the contract names none for some rules).
async fn assert_unauthorized(response: reqwest::Response) {
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (kind, _, _) = common::error_of(response).await;
    assert_eq!(kind, "authentication_error");
}

#[tokio::test]
async fn a_signed_request_reaches_the_upstream_without_the_hmac_headers() {
    let (upstream, app) = start(&[]).await;
    let response = send(&app, &Signed::chat(CHAT.as_bytes()), CHAT).await;
    assert_eq!(response.status(), 200);
    let received = upstream.last();
    assert_eq!(
        received.headers["authorization"],
        format!("Bearer {PRODUCT_KEY}").as_str()
    );
    for name in [
        "x-client-id",
        "x-timestamp",
        "x-nonce",
        "x-product-id",
        "x-user-id",
        "x-signature",
    ] {
        assert!(!received.headers.contains_key(name), "{name} was forwarded");
    }
    let forwarded = String::from_utf8(received.body.to_vec()).unwrap();
    assert!(!forwarded.contains(HMAC_SECRET));
    app.shutdown().await;
}

#[tokio::test]
async fn an_uppercase_hex_signature_is_accepted() {
    let (_upstream, app) = start(&[]).await;
    let mut signed = Signed::chat(CHAT.as_bytes());
    signed.signature = signed.signature.to_uppercase();
    assert_eq!(send(&app, &signed, CHAT).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn a_get_with_an_empty_body_is_signed_the_same_way() {
    let (_upstream, app) = start(&[]).await;
    let signed = hmac_sign(
        HMAC_SECRET,
        "GET",
        "/v1/models",
        CLIENT,
        PRODUCT,
        USER,
        Some(&nonce()),
        now(),
        b"",
    );
    let response = signed
        .apply(app.client.get(app.url("/v1/models")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn the_query_is_not_part_of_the_signed_path() {
    let (_upstream, app) = start(&[]).await;
    let signed = Signed::chat(CHAT.as_bytes());
    let request = app
        .client
        .post(app.url("/v1/chat/completions?api-version=1"))
        .body(CHAT);
    assert_eq!(signed.apply(request).send().await.unwrap().status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn a_wrong_secret_is_invalid_signature() {
    let (upstream, app) = start(&[]).await;
    let signed = hmac_sign(
        "another-secret-of-at-least-32-bytes!!",
        "POST",
        PATH,
        CLIENT,
        PRODUCT,
        USER,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    assert_401(send(&app, &signed, CHAT).await, "invalid_signature").await;
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_tampered_body_is_invalid_signature() {
    let (_upstream, app) = start(&[]).await;
    let signed = Signed::chat(CHAT.as_bytes());
    let tampered = CHAT.replace("hi", "ho");
    assert_401(send(&app, &signed, &tampered).await, "invalid_signature").await;
    // One extra byte is a different body too.
    let signed = Signed::chat(CHAT.as_bytes());
    assert_401(send(&app, &signed, &format!("{CHAT} ")).await, "invalid_signature").await;
    app.shutdown().await;
}

#[tokio::test]
async fn every_signed_header_is_covered_by_the_signature() {
    let (_upstream, app) = start(&[]).await;
    let tamper: [fn(&mut Signed); 5] = [
        |s| s.user = "mallory".to_owned(),
        |s| s.product = "other".to_owned(),
        |s| s.timestamp = (s.timestamp.parse::<u64>().unwrap() - 1).to_string(),
        |s| s.nonce = Some(nonce()),
        |s| {
            s.signature
                .replace_range(0..2, if s.signature.starts_with("00") { "11" } else { "00" });
        },
    ];
    for (i, change) in tamper.iter().enumerate() {
        let mut signed = Signed::chat(CHAT.as_bytes());
        change(&mut signed);
        let response = send(&app, &signed, CHAT).await;
        assert_eq!(response.status(), 401, "tamper #{i}");
        assert_401(response, "invalid_signature").await;
    }
    // The method and path are signed: a signature for GET /v1/models does not do for a POST.
    let signed = hmac_sign(
        HMAC_SECRET,
        "GET",
        PATH,
        CLIENT,
        PRODUCT,
        USER,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    assert_401(send(&app, &signed, CHAT).await, "invalid_signature").await;
    let signed = hmac_sign(
        HMAC_SECRET,
        "POST",
        "/v1/models",
        CLIENT,
        PRODUCT,
        USER,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    assert_401(send(&app, &signed, CHAT).await, "invalid_signature").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_malformed_signature_is_401() {
    let (_upstream, app) = start(&[]).await;
    for signature in ["", "zz", "abc", &"0".repeat(63), &"0".repeat(66), &"g".repeat(64)] {
        let mut signed = Signed::chat(CHAT.as_bytes());
        signed.signature = signature.to_owned();
        let response = send(&app, &signed, CHAT).await;
        assert_unauthorized(response).await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn an_unknown_client_is_401() {
    let (_upstream, app) = start(&[]).await;
    let signed = hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        "intruder",
        PRODUCT,
        USER,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    assert_unauthorized(send(&app, &signed, CHAT).await).await;
    app.shutdown().await;
}

#[tokio::test]
async fn missing_hmac_headers_are_401() {
    let (_upstream, app) = start(&[]).await;
    let signed = Signed::chat(CHAT.as_bytes());
    for missing in ["x-client-id", "x-timestamp", "x-product-id", "x-user-id"] {
        let mut request = app.client.post(app.url(PATH)).body(CHAT);
        for (name, value) in [
            ("x-client-id", &signed.client),
            ("x-timestamp", &signed.timestamp),
            ("x-product-id", &signed.product),
            ("x-user-id", &signed.user),
            ("x-signature", &signed.signature),
            ("x-nonce", signed.nonce.as_ref().unwrap()),
        ] {
            if name != missing {
                request = request.header(name, value);
            }
        }
        assert_unauthorized(request.send().await.unwrap()).await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_timestamp_outside_the_tolerance_is_timestamp_out_of_range() {
    let (_upstream, app) = start(&[]).await;
    for timestamp in [now() - 301, now() + 301, 0] {
        let signed = hmac_sign(
            HMAC_SECRET,
            "POST",
            PATH,
            CLIENT,
            PRODUCT,
            USER,
            Some(&nonce()),
            timestamp,
            CHAT.as_bytes(),
        );
        assert_401(send(&app, &signed, CHAT).await, "timestamp_out_of_range").await;
    }
    // Inside the window on both sides.
    for timestamp in [now() - 250, now() + 250] {
        let signed = hmac_sign(
            HMAC_SECRET,
            "POST",
            PATH,
            CLIENT,
            PRODUCT,
            USER,
            Some(&nonce()),
            timestamp,
            CHAT.as_bytes(),
        );
        assert_eq!(send(&app, &signed, CHAT).await.status(), 200);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn the_tolerance_is_configurable() {
    let (_upstream, app) = start(&[("HMAC_CLOCK_TOLERANCE_SECONDS", "10")]).await;
    let signed = hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        CLIENT,
        PRODUCT,
        USER,
        Some(&nonce()),
        now() - 60,
        CHAT.as_bytes(),
    );
    assert_401(send(&app, &signed, CHAT).await, "timestamp_out_of_range").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_non_integer_timestamp_is_401() {
    let (upstream, app) = start(&[]).await;
    let now = now();
    for timestamp in [
        format!("{now}.0"),
        format!("{now}.5"),
        "1.7e9".to_owned(),
        format!("-{now}"),
        format!("+{now}"),
        format!(" {now}"),
        "abc".to_owned(),
        "99999999999999999999999".to_owned(),
    ] {
        // Signed over the exact header value, so only the timestamp rule can refuse it.
        let mut signed = Signed::chat(CHAT.as_bytes());
        let nonce = signed.nonce.clone().unwrap();
        let body_hash = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(CHAT.as_bytes()))
        };
        let to_sign = format!("{timestamp}\nPOST\n{PATH}\n{CLIENT}\n{PRODUCT}\n{USER}\n{nonce}\n{body_hash}");
        signed.signature = {
            use hmac::{KeyInit, Mac};
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
            mac.update(to_sign.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        };
        signed.timestamp = timestamp.clone();
        let response = signed.apply(app.client.post(app.url(PATH)).body(CHAT)).send().await;
        // reqwest refuses some header values itself; those never reach the proxy.
        if let Ok(response) = response {
            assert_eq!(response.status(), 401, "{timestamp:?}");
            assert_unauthorized(response).await;
        }
    }
    assert!(upstream.requests().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_replayed_nonce_is_replayed_nonce() {
    let (upstream, app) = start(&[]).await;
    let signed = Signed::chat(CHAT.as_bytes());
    assert_eq!(send(&app, &signed, CHAT).await.status(), 200);
    assert_401(send(&app, &signed, CHAT).await, "replayed_nonce").await;
    // The same nonce with a new timestamp and a valid signature is still a replay.
    let again = signed_with(signed.nonce.as_deref(), CHAT);
    assert_401(send(&app, &again, CHAT).await, "replayed_nonce").await;
    assert_eq!(upstream.requests().len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn nonces_are_per_client() {
    let upstream = MockUpstream::openai().await;
    let secrets =
        serde_json::json!({CLIENT: HMAC_SECRET, "mobile": "mobile-secret-0123456789abcdef-0123456"}).to_string();
    let app = TestApp::spawn(&upstream.url(), &[("CLIENT_HMAC_SECRETS", &secrets)]).await;
    let shared = nonce();
    let desk = signed_with(Some(&shared), CHAT);
    let mobile = hmac_sign(
        "mobile-secret-0123456789abcdef-0123456",
        "POST",
        PATH,
        "mobile",
        PRODUCT,
        USER,
        Some(&shared),
        now(),
        CHAT.as_bytes(),
    );
    assert_eq!(send(&app, &desk, CHAT).await.status(), 200);
    assert_eq!(send(&app, &mobile, CHAT).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn a_forged_request_does_not_burn_the_nonce() {
    let (_upstream, app) = start(&[]).await;
    let genuine = Signed::chat(CHAT.as_bytes());
    let mut forged = Signed::chat(CHAT.as_bytes());
    forged.nonce.clone_from(&genuine.nonce);
    forged.signature = "0".repeat(64);
    assert_401(send(&app, &forged, CHAT).await, "invalid_signature").await;
    // A valid signature over another body does not burn it either.
    assert_401(send(&app, &genuine, "{}").await, "invalid_signature").await;
    assert_eq!(send(&app, &genuine, CHAT).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn of_concurrent_requests_with_one_nonce_exactly_one_is_accepted() {
    let (upstream, app) = start(&[]).await;
    let signed = std::sync::Arc::new(Signed::chat(CHAT.as_bytes()));
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            let signed = signed.clone();
            tokio::spawn(async move { send(&app, &signed, CHAT).await.status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 19, "{statuses:?}");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn a_nonce_of_the_wrong_format_is_401() {
    let (_upstream, app) = start(&[]).await;
    for bad in [
        "a".repeat(15),
        "a".repeat(129),
        "abcdefghijklmnop!".to_owned(),
        "abcdefgh ijklmnop".to_owned(),
        "abcdefghijklmnop.".to_owned(),
        "abcdefghijklmnop/".to_owned(),
        String::new(),
    ] {
        let signed = signed_with(Some(&bad), CHAT);
        assert_unauthorized(send(&app, &signed, CHAT).await).await;
    }
    // The edges of the format are fine.
    for good in [
        "a".repeat(16),
        "Az09_-".repeat(21).chars().take(128).collect::<String>(),
    ] {
        let signed = signed_with(Some(&good), CHAT);
        assert_eq!(send(&app, &signed, CHAT).await.status(), 200, "{good}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_missing_nonce_is_401_by_default() {
    let (_upstream, app) = start(&[]).await;
    let signed = signed_with(None, CHAT);
    assert_unauthorized(send(&app, &signed, CHAT).await).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_missing_nonce_is_accepted_when_not_required() {
    let (_upstream, app) = start(&[("HMAC_REQUIRE_NONCE", "false")]).await;
    let signed = signed_with(None, CHAT);
    assert_eq!(send(&app, &signed, CHAT).await.status(), 200);
    // A nonce that is sent is still checked.
    let with_nonce = Signed::chat(CHAT.as_bytes());
    assert_eq!(send(&app, &with_nonce, CHAT).await.status(), 200);
    assert_401(send(&app, &with_nonce, CHAT).await, "replayed_nonce").await;
    app.shutdown().await;
}

#[tokio::test]
async fn client_products_limit_what_a_client_may_use() {
    let (upstream, app) = start(&[("CLIENT_PRODUCTS", r#"{"desk": ["other"]}"#)]).await;
    let response = send(&app, &Signed::chat(CHAT.as_bytes()), CHAT).await;
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (kind, code, _) = common::error_of(response).await;
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("permission_error", "product_not_allowed")
    );
    let other = hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        CLIENT,
        "other",
        USER,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    assert_eq!(send(&app, &other, CHAT).await.status(), 200);
    assert_eq!(upstream.requests().len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn an_unknown_product_is_403() {
    let (_upstream, app) = start(&[]).await;
    let signed = hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        CLIENT,
        "nope",
        USER,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    let response = send(&app, &signed, CHAT).await;
    assert_eq!(response.status(), 403);
    let (_, code, _) = common::error_of(response).await;
    assert_eq!(code, "product_not_allowed");
    app.shutdown().await;
}

#[tokio::test]
async fn a_full_nonce_store_is_503_and_retryable() {
    let (upstream, app) = start(&[("HMAC_NONCE_CAPACITY", "2")]).await;
    let first = Signed::chat(CHAT.as_bytes());
    assert_eq!(send(&app, &first, CHAT).await.status(), 200);
    assert_eq!(send(&app, &Signed::chat(CHAT.as_bytes()), CHAT).await.status(), 200);
    let response = send(&app, &Signed::chat(CHAT.as_bytes()), CHAT).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-should-retry"], "true");
    let (kind, code, _) = common::error_of(response).await;
    assert_eq!((kind.as_str(), code.as_str()), ("server_error", "nonce_store_full"));
    // Never accepted unchecked: a replay is still a replay while full.
    assert_401(send(&app, &first, CHAT).await, "replayed_nonce").await;
    assert_eq!(upstream.requests().len(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn secrets_and_signatures_never_appear_in_responses() {
    let (_upstream, app) = start(&[]).await;
    let mut signed = Signed::chat(CHAT.as_bytes());
    let real = signed.signature.clone();
    signed.signature = "f".repeat(64);
    let response = send(&app, &signed, CHAT).await;
    let headers = format!("{:?}", response.headers());
    let body = response.text().await.unwrap();
    for secret in [HMAC_SECRET, &real, &"f".repeat(64)] {
        assert!(!body.contains(secret) && !headers.contains(secret));
    }
    app.shutdown().await;
}

#[tokio::test]
async fn replays_are_refused_in_memory_while_redis_is_down() {
    let port = common::closed_port().await;
    let redis = format!("redis://127.0.0.1:{port}");
    let (upstream, app) = start(&[
        ("REDIS_URL", &redis),
        ("REDIS_TIMEOUT_MS", "50"),
        ("HMAC_NONCE_CAPACITY", "1"),
    ])
    .await;
    let signed = Signed::chat(CHAT.as_bytes());
    assert_eq!(send(&app, &signed, CHAT).await.status(), 200);
    assert_401(send(&app, &signed, CHAT).await, "replayed_nonce").await;
    // The memory store's bound holds during the outage too: never accepted unchecked.
    let response = send(&app, &Signed::chat(CHAT.as_bytes()), CHAT).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["x-should-retry"], "true");
    assert_eq!(upstream.requests().len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn ids_are_1_to_256_bytes() {
    let (upstream, app) = start(&[]).await;
    let sign = |client: &str, product: &str, user: &str| {
        hmac_sign(
            HMAC_SECRET,
            "POST",
            PATH,
            client,
            product,
            user,
            Some(&nonce()),
            now(),
            CHAT.as_bytes(),
        )
    };
    let at_bound = "u".repeat(256);
    assert_eq!(send(&app, &sign(CLIENT, PRODUCT, &at_bound), CHAT).await.status(), 200);
    let long = "u".repeat(257);
    assert_401(
        send(&app, &sign(CLIENT, PRODUCT, &long), CHAT).await,
        "invalid_signature",
    )
    .await;
    // Malformed (401) rather than an unknown product (403).
    assert_401(send(&app, &sign(CLIENT, &long, USER), CHAT).await, "invalid_signature").await;
    assert_401(send(&app, &sign(&long, PRODUCT, USER), CHAT).await, "invalid_signature").await;
    assert_eq!(upstream.requests().len(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_huge_user_id_is_refused_by_the_binary_and_never_logged() {
    let upstream = MockUpstream::openai().await;
    let env = common::base_env(&upstream.url());
    let server = common::ServerProcess::start(&env).await;
    let user = "u".repeat(64 * 1024);
    let signed = hmac_sign(
        HMAC_SECRET,
        "POST",
        PATH,
        CLIENT,
        PRODUCT,
        &user,
        Some(&nonce()),
        now(),
        CHAT.as_bytes(),
    );
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let request = client.post(server.url(PATH)).body(CHAT);
    let response = signed.apply(request).send().await.unwrap();
    assert_401(response, "invalid_signature").await;
    // The request's log line is written once the response is; ask for a second request's
    // line to know the first is in.
    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server.output().contains("/health") {
        assert!(std::time::Instant::now() < deadline, "the log lines arrive");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let output = server.output();
    assert!(output.contains("invalid_signature"), "the refusal is logged");
    assert!(!output.contains(&"u".repeat(257)), "the long id is not logged");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn the_timestamp_window_follows_the_servers_clock() {
    let upstream = MockUpstream::openai().await;
    let clock = api_key_server::clock::ManualClock::new();
    let app = TestApp::spawn_with_clock(
        &upstream.url(),
        &[("HMAC_CLOCK_TOLERANCE_SECONDS", "60")],
        clock.clock(),
    )
    .await;
    let signed_at = clock.clock().wall().as_secs();
    let sign = || {
        hmac_sign(
            HMAC_SECRET,
            "POST",
            PATH,
            CLIENT,
            PRODUCT,
            USER,
            Some(&nonce()),
            signed_at,
            CHAT.as_bytes(),
        )
    };
    assert_eq!(send(&app, &sign(), CHAT).await.status(), 200);
    // The server's clock decides, whatever the test machine's says.
    clock.advance(std::time::Duration::from_secs(60));
    assert_eq!(send(&app, &sign(), CHAT).await.status(), 200);
    clock.advance(std::time::Duration::from_secs(1));
    assert_401(send(&app, &sign(), CHAT).await, "timestamp_out_of_range").await;
    app.shutdown().await;
}
