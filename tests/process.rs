//! The binary: configuration errors, startup logs, and the drain on SIGTERM.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{HMAC_SECRET, MockUpstream, PRODUCT_KEY, ServerProcess, base_env, binary, jwt, set};

/// Runs the binary with `env` and returns (exit code, stderr, stdout).
async fn run_to_exit(env: &HashMap<String, String>) -> (i32, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(20), binary().envs(env).output())
        .await
        .expect("exits in time")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn configuration_errors_exit_2_with_one_line_naming_the_variable_and_no_value() {
    let upstream = "http://127.0.0.1:9/v1/chat/completions";
    let weak = serde_json::json!({"k": common::fixture("weak-public.pem")}).to_string();
    let ec = serde_json::json!({"k": common::fixture("ec-public.pem")}).to_string();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![("PRODUCT_KEYS", String::new())], "API_KEY_SERVER_PRODUCT_KEYS"),
        (vec![("PRODUCT_KEYS", "{}".into())], "API_KEY_SERVER_PRODUCT_KEYS"),
        (
            vec![("PRODUCT_KEYS", r#"{"demo": "sk-bad\u0001key-SECRETVALUE"}"#.into())],
            "API_KEY_SERVER_PRODUCT_KEYS",
        ),
        (
            vec![("PRODUCT_KEYS", "{not json SECRETVALUE".into())],
            "API_KEY_SERVER_PRODUCT_KEYS",
        ),
        (
            vec![("JWT_PUBLIC_KEYS", "{}".into()), ("CLIENT_HMAC_SECRETS", "{}".into())],
            "API_KEY_SERVER_JWT_PUBLIC_KEYS",
        ),
        (
            vec![("CLIENT_HMAC_SECRETS", r#"{"c": "SECRETVALUE-too-short"}"#.into())],
            "API_KEY_SERVER_CLIENT_HMAC_SECRETS",
        ),
        (vec![("JWT_PUBLIC_KEYS", weak)], "API_KEY_SERVER_JWT_PUBLIC_KEYS"),
        (vec![("JWT_PUBLIC_KEYS", ec)], "API_KEY_SERVER_JWT_PUBLIC_KEYS"),
        (vec![("MAX_TOKENS", "0".into())], "API_KEY_SERVER_MAX_TOKENS"),
        (
            vec![("RATE_LIMIT_CAPACITY", "0".into())],
            "API_KEY_SERVER_RATE_LIMIT_CAPACITY",
        ),
        (vec![("DAILY_QUOTA", "0".into())], "API_KEY_SERVER_DAILY_QUOTA"),
        (
            vec![("RATE_LIMIT_REFILL_PER_SECOND", "-1".into())],
            "API_KEY_SERVER_RATE_LIMIT_REFILL_PER_SECOND",
        ),
        (
            vec![("TEMPERATURE_RANGE", "[1.5, 0.5]".into())],
            "API_KEY_SERVER_TEMPERATURE_RANGE",
        ),
        (vec![("ALLOWED_MODELS", "[]".into())], "API_KEY_SERVER_ALLOWED_MODELS"),
        (
            vec![("CLIENT_PRODUCTS", r#"{"ghost": ["demo"]}"#.into())],
            "API_KEY_SERVER_CLIENT_PRODUCTS",
        ),
        (
            vec![("CLIENT_LIMITS", r#"{"desk": {"burst": 1}}"#.into())],
            "API_KEY_SERVER_CLIENT_LIMITS",
        ),
        (
            vec![("PRODUCT_LIMITS", r#"{"nope": {"capacity": 1}}"#.into())],
            "API_KEY_SERVER_PRODUCT_LIMITS",
        ),
        (
            vec![
                ("REDIS_URL", "redis://:SECRETVALUE@127.0.0.1:6379".into()),
                ("REDIS_CA_CERT", "x".into()),
            ],
            "API_KEY_SERVER_REDIS_CA_CERT",
        ),
        (
            vec![("OPENAI_BASE_URL", "ftp://SECRETVALUE".into())],
            "API_KEY_SERVER_OPENAI_BASE_URL",
        ),
        (
            vec![("UPSTREAM_TIMEOUT_SECONDS", "soon".into())],
            "API_KEY_SERVER_UPSTREAM_TIMEOUT_SECONDS",
        ),
        (vec![("PORT", "http".into())], "PORT"),
    ];
    for (vars, variable) in cases {
        let mut env = base_env(upstream);
        for (name, value) in &vars {
            set(&mut env, name, value);
        }
        let (code, stderr, stdout) = run_to_exit(&env).await;
        assert_eq!(code, 2, "{vars:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line for {vars:?}: {stderr}");
        assert!(lines[0].contains(variable), "{variable} in {stderr}");
        for secret in ["SECRETVALUE", PRODUCT_KEY, HMAC_SECRET] {
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "{secret} printed for {vars:?}"
            );
        }
    }
}

/// Asserts that the binary refuses `env` with exit 2 and one line naming `variable`,
/// without any of `hidden`.
async fn assert_refused(env: &HashMap<String, String>, variable: &str, hidden: &[&str]) {
    let (code, stderr, stdout) = run_to_exit(env).await;
    assert_eq!(code, 2, "{variable}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line for {variable}: {stderr}");
    assert!(lines[0].contains(variable), "{variable} in {stderr}");
    for value in hidden {
        assert!(
            !stderr.contains(value) && !stdout.contains(value),
            "a value printed for {variable}"
        );
    }
}

#[tokio::test]
async fn ids_over_256_bytes_in_settings_exit_2_without_printing_them() {
    let upstream = "http://127.0.0.1:9/v1/chat/completions";
    let long = "i".repeat(257);
    let secret = HMAC_SECRET;
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("PRODUCT_KEYS", format!(r#"{{"demo": "sk-a", "{long}": "sk-b"}}"#))],
            "API_KEY_SERVER_PRODUCT_KEYS",
        ),
        (
            vec![("CLIENT_HMAC_SECRETS", format!(r#"{{"{long}": "{secret}"}}"#))],
            "API_KEY_SERVER_CLIENT_HMAC_SECRETS",
        ),
        (
            vec![("CLIENT_PRODUCTS", format!(r#"{{"{long}": ["demo"]}}"#))],
            "API_KEY_SERVER_CLIENT_PRODUCTS",
        ),
        (
            vec![("CLIENT_PRODUCTS", format!(r#"{{"desk": ["demo", "{long}"]}}"#))],
            "API_KEY_SERVER_CLIENT_PRODUCTS",
        ),
        (
            vec![("CLIENT_LIMITS", format!(r#"{{"{long}": {{"capacity": 1}}}}"#))],
            "API_KEY_SERVER_CLIENT_LIMITS",
        ),
        (
            vec![("PRODUCT_LIMITS", format!(r#"{{"{long}": {{"capacity": 1}}}}"#))],
            "API_KEY_SERVER_PRODUCT_LIMITS",
        ),
        (
            vec![("PRODUCT_KEYS", r#"{"demo": "sk-a", "": "sk-b"}"#.to_owned())],
            "API_KEY_SERVER_PRODUCT_KEYS",
        ),
    ];
    for (vars, variable) in cases {
        let mut env = base_env(upstream);
        for (name, value) in &vars {
            set(&mut env, name, value);
        }
        assert_refused(&env, variable, &[&long, PRODUCT_KEY, HMAC_SECRET]).await;
    }
}

#[tokio::test]
async fn unknown_variables_are_warned_about_by_name_only_and_port_0_is_logged() {
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    env.insert("API_KEY_SERVER_MAX_TOKEN".into(), "SECRETVALUE-typo".into());
    let server = ServerProcess::start(&env).await;
    let response = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(response.status(), 200);
    let output = server.output();
    assert!(output.contains("API_KEY_SERVER_MAX_TOKEN"), "{output}");
    assert!(!output.contains("SECRETVALUE"), "{output}");
    let listening = output.lines().find(|l| l.contains("listening")).unwrap();
    let line: serde_json::Value = serde_json::from_str(listening).unwrap();
    assert!(
        line["address"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", server.addr.port()))
    );
    server.terminate();
}

#[tokio::test]
async fn an_unreachable_redis_neither_delays_nor_fails_startup() {
    let upstream = MockUpstream::openai().await;
    let mut env = base_env(&upstream.url());
    let port = common::closed_port().await;
    set(&mut env, "REDIS_URL", &format!("redis://:SECRETVALUE@127.0.0.1:{port}"));
    let started = std::time::Instant::now();
    let server = ServerProcess::start(&env).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .body(common::CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!server.output().contains("SECRETVALUE"));
    server.terminate();
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish_then_exits_0() {
    let (upstream, rx) = MockUpstream::driven().await;
    let env = base_env(&upstream.url());
    let mut server = ServerProcess::start(&env).await;
    let mut response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#)
        .send()
        .await
        .unwrap();
    let (feed, _dropped) = rx.await.unwrap();
    feed.send(Ok(Bytes::from_static(b"data: 1\n\n"))).await.unwrap();
    assert_eq!(response.chunk().await.unwrap().unwrap(), "data: 1\n\n");

    server.terminate();
    // Draining: new connections are refused, the stream goes on.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        reqwest::get(server.url("/health")).await.is_err(),
        "still accepting after SIGTERM"
    );
    feed.send(Ok(Bytes::from_static(b"data: 2\n\n"))).await.unwrap();
    assert_eq!(response.chunk().await.unwrap().unwrap(), "data: 2\n\n");
    drop(feed);
    assert_eq!(response.chunk().await.unwrap(), None);
    let status = tokio::time::timeout(Duration::from_secs(10), server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// SIGTERM's handler is in place before the address is logged (Linux's `SigCgt` mask),
/// so a SIGTERM right after `listening` drains and exits 0 instead of killing the process.
#[tokio::test]
async fn sigterm_is_caught_from_the_moment_the_address_is_logged() {
    let upstream = MockUpstream::openai().await;
    let env = base_env(&upstream.url());
    for _ in 0..3 {
        let mut server = ServerProcess::start(&env).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id().unwrap())).unwrap();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap();
        assert_ne!(caught & (1 << (15 - 1)), 0, "SIGTERM not caught yet: {caught:x}");
        server.terminate();
        let exit = tokio::time::timeout(Duration::from_secs(10), server.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.code(), Some(0), "{exit:?}");
    }
}

#[tokio::test]
async fn the_drain_ends_after_the_grace_period() {
    let (upstream, rx) = MockUpstream::driven().await;
    let mut env = base_env(&upstream.url());
    set(&mut env, "SHUTDOWN_GRACE_SECONDS", "0.5");
    let mut server = ServerProcess::start(&env).await;
    let _response = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(jwt("demo", "u"))
        .body(common::CHAT)
        .send()
        .await
        .unwrap();
    let (_feed, _dropped) = rx.await.unwrap();
    let started = std::time::Instant::now();
    server.terminate();
    let status = tokio::time::timeout(Duration::from_secs(10), server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited after the grace period, not the stream's end"
    );
}

#[tokio::test]
async fn a_redis_ca_cert_without_a_parsable_certificate_exits_2() {
    let upstream = "http://127.0.0.1:9/v1/chat/completions";
    let key_body = |fixture: &str| {
        common::fixture(fixture)
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let as_certificate = |body: &str| format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
    let cases = [
        // Valid base64, not DER at all.
        as_certificate("AAAA"),
        // DER, but a public key rather than a certificate.
        as_certificate(&key_body("jwt-public.pem")),
        // PEM with no certificate in it.
        common::fixture("jwt-public.pem"),
        common::fixture("jwt-private.pem"),
        // Not PEM.
        "x".to_owned(),
    ];
    for ca in cases {
        let mut env = base_env(upstream);
        set(&mut env, "REDIS_URL", "rediss://:SECRETVALUE@127.0.0.1:6380");
        set(&mut env, "REDIS_CA_CERT", &ca);
        assert_refused(&env, "API_KEY_SERVER_REDIS_CA_CERT", &["SECRETVALUE", "AAAA"]).await;
    }
}
