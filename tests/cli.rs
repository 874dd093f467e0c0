//! The client tools as a user runs them: `mint-jwt`, `sign` and `dev`, through the real
//! binary with a cleared environment.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{CHAT, CLIENT, HMAC_SECRET, KID, MockUpstream, PRODUCT, TestApp, USER, binary, fixture, hmac_sign, now};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = binary();
    command.args(args).envs(env.iter().copied()).stdin(Stdio::null());
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the command ends")
        .expect("the binary runs")
}

/// `mint-jwt` with the test key file `key`, kid, product and user, plus `extra` flags.
async fn mint(key: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "mint-jwt",
        "--key",
        key,
        "--kid",
        KID,
        "--product",
        PRODUCT,
        "--user",
        USER,
    ];
    args.extend_from_slice(extra);
    run(&args, &[]).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn fixture_path(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The base64 lines of a PEM file: none of them may ever be printed.
fn key_material(name: &str) -> Vec<String> {
    fixture(name)
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() > 16)
        .map(str::to_owned)
        .collect()
}

fn decode(token: &str, validation: &jsonwebtoken::Validation) -> jsonwebtoken::TokenData<serde_json::Value> {
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(fixture("jwt-public.pem").as_bytes()).unwrap();
    jsonwebtoken::decode::<serde_json::Value>(token, &key, validation).expect("the token verifies")
}

#[tokio::test]
async fn mint_jwt_prints_an_rs256_token_that_verifies_with_the_public_key() {
    let key = fixture_path("jwt-private.pem");
    let output = mint(&key, &[]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let token = stdout(&output).trim().to_owned();
    assert_eq!(stdout(&output).lines().count(), 1);

    let data = decode(&token, &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256));
    assert_eq!(data.header.alg, jsonwebtoken::Algorithm::RS256);
    assert_eq!(data.header.typ.as_deref(), Some("JWT"));
    assert_eq!(data.header.kid.as_deref(), Some(KID));
    let claims = data.claims;
    assert_eq!(claims["sub"], USER);
    assert_eq!(claims["product"], PRODUCT);
    let iat = claims["iat"].as_u64().unwrap();
    assert!(iat.abs_diff(now()) <= 5);
    assert_eq!(claims["exp"].as_u64().unwrap() - iat, 300, "default ttl");
    assert!(claims.get("iss").is_none() && claims.get("aud").is_none());
}

#[tokio::test]
async fn mint_jwt_sets_ttl_issuer_and_audience() {
    let key = fixture_path("jwt-private.pem");
    let output = mint(&key, &["--ttl", "60", "--issuer", "backend", "--audience", "gateway"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_issuer(&["backend"]);
    validation.set_audience(&["gateway"]);
    let claims = decode(stdout(&output).trim(), &validation).claims;
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 60);
}

#[tokio::test]
async fn a_minted_token_is_accepted_by_the_proxy() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let key = fixture_path("jwt-private.pem");
    let output = mint(&key, &[]).await;
    let response = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(stdout(&output).trim())
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn mint_jwt_refuses_a_missing_key_file_with_exit_2() {
    let output = mint("/nonexistent/key.pem", &[]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.contains("/nonexistent/key.pem"), "{message}");
}

#[tokio::test]
async fn mint_jwt_refuses_keys_that_are_not_rsa_private_keys_without_printing_them() {
    for name in ["jwt-public.pem", "ec-private.pem", "weak-private.pem", "README.md"] {
        let key = fixture_path(name);
        let output = mint(&key, &[]).await;
        assert_eq!(output.status.code(), Some(2), "{name}");
        assert!(stdout(&output).is_empty(), "{name}");
        let message = stderr(&output);
        assert_eq!(message.lines().count(), 1, "{name}: {message}");
        assert!(!message.contains("BEGIN"), "{name}: {message}");
        if name != "README.md" {
            for line in key_material(name) {
                assert!(!message.contains(&line[..16]), "{name}: key material in {message}");
            }
        }
    }
}

#[tokio::test]
async fn mint_jwt_refuses_a_zero_ttl() {
    let key = fixture_path("jwt-private.pem");
    let output = mint(&key, &["--ttl", "0"]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
}

/// The `-H 'Name: value'` lines of `sign`, as a map.
fn headers_of(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(|line| {
            let quoted = line
                .strip_prefix("-H '")
                .and_then(|l| l.strip_suffix('\''))
                .unwrap_or_else(|| {
                    panic!("not a curl -H line: {line}");
                });
            let (name, value) = quoted.split_once(": ").unwrap();
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn sign_prints_curl_headers_whose_signature_follows_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let body_path = dir.path().join("body.json");
    std::fs::write(&body_path, CHAT).unwrap();
    let output = run(
        &[
            "sign",
            "--client",
            CLIENT,
            "--secret-env",
            "DESK_SECRET",
            "--product",
            PRODUCT,
            "--user",
            USER,
            "--body",
            body_path.to_str().unwrap(),
        ],
        &[("DESK_SECRET", HMAC_SECRET)],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(!text.contains(HMAC_SECRET) && !stderr(&output).contains(HMAC_SECRET));
    let headers = headers_of(&text);
    let names: Vec<&str> = text.lines().map(|l| &l[4..l.find(':').unwrap()]).collect();
    assert_eq!(
        names,
        [
            "X-Client-Id",
            "X-Product-Id",
            "X-User-Id",
            "X-Timestamp",
            "X-Nonce",
            "X-Signature"
        ]
    );
    assert_eq!(headers["X-Client-Id"], CLIENT);
    assert_eq!(headers["X-Product-Id"], PRODUCT);
    assert_eq!(headers["X-User-Id"], USER);
    let timestamp: u64 = headers["X-Timestamp"].parse().unwrap();
    assert!(timestamp.abs_diff(now()) <= 5);
    let nonce = &headers["X-Nonce"];
    assert_eq!(nonce.len(), 32);
    assert!(
        nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );

    let expected = hmac_sign(
        HMAC_SECRET,
        "POST",
        "/v1/chat/completions",
        CLIENT,
        PRODUCT,
        USER,
        Some(nonce),
        timestamp,
        CHAT.as_bytes(),
    );
    assert_eq!(headers["X-Signature"], expected.signature);
}

#[tokio::test]
async fn sign_uses_a_fresh_nonce_each_time() {
    let args = [
        "sign",
        "--client",
        CLIENT,
        "--secret-env",
        "S",
        "--product",
        PRODUCT,
        "--user",
        USER,
    ];
    let a = headers_of(&stdout(&run(&args, &[("S", HMAC_SECRET)]).await));
    let b = headers_of(&stdout(&run(&args, &[("S", HMAC_SECRET)]).await));
    assert_ne!(a["X-Nonce"], b["X-Nonce"]);
}

#[tokio::test]
async fn sign_reads_the_body_from_stdin_and_signs_method_path_and_no_nonce() {
    let mut command = binary();
    command
        .args([
            "sign",
            "--client",
            CLIENT,
            "--secret-env",
            "S",
            "--product",
            PRODUCT,
            "--user",
            USER,
            "--body",
            "-",
            "--method",
            "get",
            "--path",
            "/v1/models?x=1",
            "--no-nonce",
        ])
        .env("S", HMAC_SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"exact bytes\n").await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let headers = headers_of(&stdout(&output));
    assert!(!headers.contains_key("X-Nonce"));
    let timestamp: u64 = headers["X-Timestamp"].parse().unwrap();
    let expected = hmac_sign(
        HMAC_SECRET,
        "GET",
        "/v1/models",
        CLIENT,
        PRODUCT,
        USER,
        None,
        timestamp,
        b"exact bytes\n",
    );
    assert_eq!(headers["X-Signature"], expected.signature);
}

#[tokio::test]
async fn sign_without_the_secret_variable_fails_with_exit_2() {
    let output = run(
        &[
            "sign",
            "--client",
            CLIENT,
            "--secret-env",
            "UNSET_SECRET",
            "--product",
            PRODUCT,
            "--user",
            USER,
        ],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stdout(&output).is_empty());
    assert!(stderr(&output).contains("UNSET_SECRET"));
}

#[tokio::test]
async fn headers_from_sign_are_accepted_by_the_proxy() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let body_path = dir.path().join("body.json");
    std::fs::write(&body_path, CHAT).unwrap();
    let output = run(
        &[
            "sign",
            "--client",
            CLIENT,
            "--secret-env",
            "S",
            "--product",
            PRODUCT,
            "--user",
            USER,
            "--body",
            body_path.to_str().unwrap(),
        ],
        &[("S", HMAC_SECRET)],
    )
    .await;
    let mut request = app.client.post(app.url("/v1/chat/completions")).body(CHAT);
    for (name, value) in headers_of(&stdout(&output)) {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    app.shutdown().await;
}

/// `dev` as a child process, with what its banner said.
struct Dev {
    child: tokio::process::Child,
    banner: HashMap<String, String>,
    output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Dev {
    async fn start() -> Self {
        let mut command = binary();
        command
            .arg("dev")
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = HashMap::new();
        let read = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let line = line.strip_prefix("export ").unwrap_or(&line).to_owned();
                if let Some((key, value)) = line.split_once('=')
                    && key.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                {
                    banner.insert(key.to_owned(), value.to_owned());
                }
                if line.starts_with("Ctrl-C") {
                    return;
                }
            }
            panic!("dev ended before its banner");
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("dev prints its banner");
        // Keep reading, so that the server's log lines never block on a full pipe.
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let collected = output.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        Self { child, banner, output }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.banner["URL"])
    }
}

#[tokio::test]
async fn dev_serves_the_whole_path_offline_and_stops_on_sigterm() {
    let mut dev = Dev::start().await;
    assert!(dev.banner["URL"].starts_with("http://127.0.0.1:"), "{:?}", dev.banner);
    assert_eq!(dev.banner["HMAC_CLIENT"], "dev-client");
    assert!(dev.banner["DEV_HMAC_SECRET"].len() >= 32);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let token = dev.banner["JWT"].clone();

    let health = client.get(dev.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let response = client
        .post(dev.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"ping"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reply: serde_json::Value = response.json().await.unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "gpt-4o-mini");
    assert!(
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("ping")
    );
    assert!(reply["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let response = client
        .post(dev.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"ping"}],"stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = response.text().await.unwrap();
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");
    let text: String = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .inspect(|chunk| assert_eq!(chunk["model"], "gpt-4o"))
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!(text.contains("ping"), "{text}");

    // HMAC with the printed client and secret, signed by `sign`.
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"signed"}]}"#;
    let dir = tempfile::tempdir().unwrap();
    let body_path = dir.path().join("body.json");
    std::fs::write(&body_path, body).unwrap();
    let signed = run(
        &[
            "sign",
            "--client",
            &dev.banner["HMAC_CLIENT"],
            "--secret-env",
            "DEV_HMAC_SECRET",
            "--product",
            "demo",
            "--user",
            "bob",
            "--body",
            body_path.to_str().unwrap(),
        ],
        &[("DEV_HMAC_SECRET", &dev.banner["DEV_HMAC_SECRET"])],
    )
    .await;
    let mut request = client.post(dev.url("/v1/chat/completions")).body(body);
    for (name, value) in headers_of(&stdout(&signed)) {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await.unwrap().status(), 200);

    let pid = dev.child.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(15), dev.child.wait())
        .await
        .expect("dev stops after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", dev.output.lock().unwrap().join("\n"));
}

#[tokio::test]
async fn dev_shows_a_second_product_on_an_upstream_of_its_own() {
    let dev = Dev::start().await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let token = dev.banner["JWT"].clone();
    let partner = dev.banner["PARTNER_JWT"].clone();
    let partner_chat = r#"{"model":"partner-chat-mini","messages":[{"role":"user","content":"ping"}]}"#;
    let response = client
        .post(dev.url("/v1/chat/completions"))
        .bearer_auth(&partner)
        .body(partner_chat)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reply: serde_json::Value = response.json().await.unwrap();
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("partner"), "{content}");
    let models: serde_json::Value = client
        .get(dev.url("/v1/models"))
        .bearer_auth(&partner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Its own chat model, and the default embedding models (it names none of its own).
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["partner-chat-mini", "text-embedding-3-small", "text-embedding-3-large"]
    );
    let other = client
        .post(dev.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .body(partner_chat)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 400, "demo's models are the default ones");
}
