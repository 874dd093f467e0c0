//! The fuzz harnesses on stable: every kept input under `tests/corpus/<target>/` (seeds
//! and past findings) replayed, plus proptest-generated inputs for each target, plus
//! property tests of the validation rules (against an independent statement of them) and
//! of the limiter arithmetic (through the public `Limiter` with a hand-moved clock).
//!
//! libFuzzer runs the same harness functions (`fuzz/src/lib.rs`) when nightly is
//! installed: `scripts/fuzz`.
#![allow(clippy::unwrap_used)]

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use api_key_server::auth::Identity;
use api_key_server::clock::ManualClock;
use api_key_server::error::ApiError;
use api_key_server::limit::{LimitError, Limiter};
use api_key_server::settings::{LimitSettings, Limits};
use api_key_server::validate;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::Config;

#[test]
fn every_kept_fuzz_input_replays_without_a_finding() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
    let mut total = 0;
    for (name, run) in harness::TARGETS {
        let mut files: Vec<_> = std::fs::read_dir(format!("{root}/{name}"))
            .unwrap_or_else(|e| panic!("{root}/{name}: {e}"))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name} has kept inputs");
        for file in &files {
            let data = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} fails its harness", file.display());
        }
        total += files.len();
    }
    eprintln!("replayed {total} kept fuzz inputs");
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn validate_body_harness_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        harness::validate_body(&data);
    }

    #[test]
    fn validate_body_harness_on_json_like_text(data in r#"[{}\[\]":,0-9a-z_. -]{0,120}"#) {
        harness::validate_body(format!(r#"{{"model":"gpt-4o","messages":[1],{data}"#).as_bytes());
        harness::validate_body(data.as_bytes());
    }

    #[test]
    fn jwt_token_harness_on_random_text(data in r"[A-Za-z0-9_.=+/ -]{0,300}") {
        harness::jwt_token(data.as_bytes());
    }

    #[test]
    fn hmac_headers_harness_on_random_fields(
        client in prop_oneof![Just("desk".to_owned()), "[a-z]{0,6}"],
        timestamp in prop_oneof![Just("NOW".to_owned()), "[0-9-]{0,12}"],
        nonce in "[A-Za-z0-9_!-]{0,20}",
        product in prop_oneof![Just("demo".to_owned()), Just("other".to_owned()), "[a-z]{0,5}"],
        user in "[ -~]{0,10}",
        sign in any::<bool>(),
        body in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let signature = if sign { "SIGN" } else { "00" };
        let mut data = format!("{client}\n{timestamp}\n{nonce}\n{product}\n{user}\n{signature}\nPOST\n/v1/chat/completions\n")
            .into_bytes();
        data.extend_from_slice(&body);
        harness::hmac_headers(&data);
    }

    #[test]
    fn settings_harness_on_random_lines(
        lines in proptest::collection::vec(
            (
                prop_oneof![
                    Just("PRODUCT_KEYS"), Just("CLIENT_HMAC_SECRETS"), Just("CLIENT_PRODUCTS"),
                    Just("CLIENT_LIMITS"), Just("PRODUCT_LIMITS"), Just("MAX_TOKENS"),
                    Just("TEMPERATURE_RANGE"), Just("RATE_LIMIT_REFILL_PER_SECOND"), Just("PORT"),
                    Just("REDIS_URL"), Just("UPSTREAM_TIMEOUT_SECONDS"), Just("ALLOWED_MODELS"),
                ],
                r#"[{}\[\]":,0-9a-zA-Z_. -]{0,40}"#,
            ),
            0..6,
        ),
    ) {
        let mut text = String::from(
            "PRODUCT_KEYS={\"demo\":\"sk-SECRETMARK-0001\"}\nCLIENT_HMAC_SECRETS={\"c\":\"SECRETMARK-0123456789abcdef0123456789\"}\n",
        );
        for (name, value) in lines {
            let _ = writeln!(text, "{name}={value}");
        }
        harness::settings(text.as_bytes());
    }
}

proptest! {
    // Each case signs a token with RSA: fewer cases.
    #![proptest_config(config(128))]

    #[test]
    fn jwt_claims_harness_on_generated_claims(
        sub in prop_oneof![Just("\"u\"".to_owned()), Just("\"\"".to_owned()), Just("7".to_owned()), Just("null".to_owned())],
        product in prop_oneof![Just("\"demo\""), Just("\"other\""), Just("\"nope\""), Just("1")],
        iat in prop_oneof![Just("NOW".to_owned()), Just("PAST".to_owned()), Just("LATER".to_owned()), "-?[0-9]{1,12}(\\.[0-9]{1,3})?"],
        exp in prop_oneof![Just("LATER".to_owned()), Just("NOW".to_owned()), Just("PAST".to_owned()), "-?[0-9]{1,12}(e[0-9]{1,3})?"],
        nbf in proptest::option::of(prop_oneof![Just("NOW".to_owned()), Just("LATER".to_owned()), Just("\"x\"".to_owned())]),
    ) {
        let nbf = nbf.map(|n| format!(r#","nbf":{n}"#)).unwrap_or_default();
        let claims = format!(r#"{{"sub":{sub},"product":{product},"iat":{iat},"exp":{exp}{nbf}}}"#);
        harness::jwt_claims(claims.as_bytes());
    }

    #[test]
    fn jwt_header_harness_on_generated_headers(
        alg in prop_oneof![Just("RS256"), Just("none"), Just("HS256"), Just("RS384"), Just("PS256"), Just("ES256")],
        kid in prop_oneof![Just("\"test-kid\"".to_owned()), Just("null".to_owned()), "\"[a-z-]{0,8}\""],
        extra in prop_oneof![Just(String::new()), Just(r#","jku":"http://127.0.0.1:9/""#.to_owned()), Just(r#","alg":"none""#.to_owned())],
    ) {
        harness::jwt_header(format!(r#"{{"alg":"{alg}","kid":{kid}{extra}}}"#).as_bytes());
    }
}

/// One candidate member of a chat body: its JSON text, or absent.
fn member(values: &'static [&'static str]) -> impl Strategy<Value = Option<&'static str>> {
    proptest::option::of(proptest::sample::select(values))
}

const MODELS: &[&str] = &[r#""gpt-4o""#, r#""gpt-4o-mini""#, r#""gpt-nope""#, "5", "null"];
const MESSAGES: &[&str] = &[
    r#"[{"role":"user","content":"x"}]"#,
    "[]",
    "[ ]",
    r#""x""#,
    "{}",
    "null",
];
const LIMITS: &[&str] = &[
    "null",
    "1",
    "16",
    "2048",
    "2049",
    "0",
    "-1",
    "-0",
    "2048.0",
    "1e3",
    r#""100""#,
    "true",
    "99999999999",
];
const TEMPERATURES: &[&str] = &[
    "null", "0", "0.7", "2", "2.0001", "-0.5", "-0.0", r#""1""#, "true", "1e400",
];

/// The contract's rules, stated independently of `validate.rs`, in its order of checks.
fn expected(members: &[(&str, &str)]) -> Result<(), (&'static str, Option<&'static str>)> {
    let get = |k: &str| members.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    match get("model") {
        None => return Err(("missing_required_field", Some("model"))),
        Some(m) if !m.starts_with('"') => return Err(("invalid_type", Some("model"))),
        Some(m) if m != r#""gpt-4o""# && m != r#""gpt-4o-mini""# => return Err(("model_not_allowed", Some("model"))),
        Some(_) => {}
    }
    match get("messages") {
        None => return Err(("missing_required_field", Some("messages"))),
        Some(m) if !m.starts_with('[') => return Err(("invalid_type", Some("messages"))),
        Some("[]" | "[ ]") => return Err(("invalid_messages", Some("messages"))),
        Some(_) => {}
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        let Some(v) = get(field).filter(|v| *v != "null") else {
            continue;
        };
        let param = Some(if field == "max_tokens" {
            "max_tokens"
        } else {
            "max_completion_tokens"
        });
        match v.parse::<i128>() {
            Err(_) => return Err(("invalid_type", param)),
            Ok(n) if n < 1 => return Err(("invalid_value", param)),
            Ok(n) if n > 2048 => return Err(("max_tokens_too_large", param)),
            Ok(_) => {}
        }
    }
    if let Some(t) = get("temperature").filter(|t| *t != "null") {
        match t.parse::<f64>() {
            Err(_) => return Err(("invalid_type", Some("temperature"))),
            Ok(t) if !(0.0..=2.0).contains(&t) => return Err(("temperature_out_of_range", Some("temperature"))),
            Ok(_) => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn validation_follows_the_contract_rules_in_order(
        model in member(MODELS),
        messages in member(MESSAGES),
        max_tokens in member(LIMITS),
        max_completion_tokens in member(LIMITS),
        temperature in member(TEMPERATURES),
        stream in member(&["true", "false", r#""true""#]),
        extra in member(&[r#"{"a":[1,{"b":null}]}"#, r#""max_tokens""#]),
        duplicate in any::<bool>(),
        order in any::<proptest::sample::Index>(),
    ) {
        let mut members: Vec<(&str, &str)> = [
            ("model", model), ("messages", messages), ("max_tokens", max_tokens),
            ("max_completion_tokens", max_completion_tokens), ("temperature", temperature),
            ("stream", stream), ("extra", extra),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        if !members.is_empty() {
            let at = order.index(members.len());
            members.rotate_left(at);
        }
        let mut text: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        if duplicate && let Some(first) = text.first().cloned() {
            text.push(first);
        }
        let body = Bytes::from(format!("{{{}}}", text.join(",")));
        let policy = api_key_server::settings::Settings::from_lookup(|k| match k {
            "API_KEY_SERVER_PRODUCT_KEYS" => Some(r#"{"demo":"sk-x"}"#.to_owned()),
            "API_KEY_SERVER_CLIENT_HMAC_SECRETS" => Some(r#"{"c":"0123456789abcdef0123456789abcdef"}"#.to_owned()),
            _ => None,
        })
        .unwrap()
        .policy;
        let got = validate::chat(&body, &policy, validate::Options::default());
        let want = if duplicate && !members.is_empty() { Err(("invalid_json", None)) } else { expected(&members) };
        match (&got, want) {
            (Ok(request), Ok(())) => {
                let limited = ["max_tokens", "max_completion_tokens"]
                    .iter()
                    .any(|f| members.iter().any(|(k, v)| k == f && *v != "null"));
                if limited {
                    prop_assert_eq!(&request.body, &body, "unchanged bodies forward their bytes");
                } else {
                    let sent: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
                    prop_assert_eq!(&sent["max_tokens"], &serde_json::json!(2048));
                    prop_assert!(sent.get("max_completion_tokens").is_none());
                }
                prop_assert_eq!(request.stream, stream == Some("true"));
            }
            (Err(error), Err((code, param))) => {
                let error = ApiError::from(error.clone());
                prop_assert_eq!(error.code(), code, "{}", String::from_utf8_lossy(&body));
                prop_assert_eq!(error.param(), param);
            }
            _ => prop_assert!(false, "{} -> {:?}, expected {:?}", String::from_utf8_lossy(&body), got.as_ref().map(|_| ()).map_err(|e| ApiError::from(e.clone()).code()), want),
        }
    }
}

/// 2026-01-01T00:00:00Z, in microseconds.
const START: u64 = 1_767_225_600 * 1_000_000;

fn limiter(capacity: u32, rate: f64, quota: u64) -> (Limiter, Arc<ManualClock>) {
    let limits = Limits {
        capacity: NonZeroU32::new(capacity).unwrap(),
        refill_per_second: rate,
        daily_quota: NonZeroU64::new(quota).unwrap(),
    };
    let settings = LimitSettings {
        default: limits,
        products: HashMap::new(),
        clients: HashMap::new(),
    };
    let clock = ManualClock::at(Duration::from_micros(START));
    (Limiter::with_clock(&settings, None, clock.clock()), clock)
}

fn user() -> Identity {
    Identity {
        product: Arc::from("demo"),
        user: "u".into(),
        client: None,
    }
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(config(512))]

    /// `Retry-After` (whole seconds) is the truth: a client that waits that long after a
    /// rate-limit refusal is admitted (the quota being large).
    #[test]
    fn waiting_retry_after_is_enough(
        capacity in 1u32..20,
        rate in prop_oneof![0.01f64..1.0, 1.0f64..200.0],
        gaps in proptest::collection::vec(0u64..2_000_000, 1..60),
    ) {
        let (limiter, clock) = limiter(capacity, rate, 1_000_000);
        block_on(async {
            for gap in gaps {
                clock.advance(Duration::from_micros(gap));
                if let Err(refusal @ LimitError::RateLimited { .. }) = limiter.admit(&user()).await {
                    let mut headers = http::HeaderMap::new();
                    refusal.write_headers(&mut headers);
                    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                    prop_assert!(wait >= 1);
                    clock.advance(Duration::from_secs(wait));
                    let retried = limiter.admit(&user()).await;
                    prop_assert!(retried.is_ok(), "refused again after Retry-After: {wait} s (rate {rate}): {retried:?}");
                }
            }
            Ok(())
        })?;
    }

    /// A refused request takes nothing: inserting refused attempts between the requests of
    /// a sequence changes none of that sequence's decisions.
    #[test]
    fn refused_requests_take_nothing(
        capacity in 1u32..10,
        rate in 0.1f64..20.0,
        quota in 1u64..30,
        steps in proptest::collection::vec((0u64..1_500_000, 0u8..3), 1..80),
    ) {
        let (plain, plain_clock) = limiter(capacity, rate, quota);
        let (noisy, noisy_clock) = limiter(capacity, rate, quota);
        block_on(async {
            for (gap, extra) in steps {
                plain_clock.advance(Duration::from_micros(gap));
                noisy_clock.advance(Duration::from_micros(gap));
                let a = plain.admit(&user()).await.is_ok();
                let b = noisy.admit(&user()).await.is_ok();
                prop_assert_eq!(a, b);
                // Only attempts that are refused are inserted: after a refusal, retry at
                // once (still refused: no time passed).
                if !a {
                    for _ in 0..extra {
                        prop_assert!(noisy.admit(&user()).await.is_err());
                    }
                }
            }
            Ok(())
        })?;
    }

    /// Never more than the bucket allows, nor more than the quota per UTC day.
    #[test]
    fn admissions_stay_within_bucket_and_quota(
        capacity in 1u32..10,
        rate in 0.1f64..50.0,
        quota in 1u64..40,
        gaps in proptest::collection::vec(0u64..20_000_000_000, 1..100),
    ) {
        let (limiter, clock) = limiter(capacity, rate, quota);
        block_on(async {
            let mut per_day: HashMap<u64, u64> = HashMap::new();
            let mut admitted = 0u64;
            for gap in gaps {
                // Mostly short gaps, sometimes across days.
                let gap = if gap % 7 == 0 { gap } else { gap % 3_000_000 };
                clock.advance(Duration::from_micros(gap));
                let now = clock.clock().unix_micros();
                if limiter.admit(&user()).await.is_ok() {
                    admitted += 1;
                    *per_day.entry(now / 86_400_000_000).or_default() += 1;
                }
                #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let allowed = f64::from(capacity) + (now - START) as f64 / 1e6 * rate;
                #[allow(clippy::cast_precision_loss)]
                let within = admitted as f64 <= allowed + 1e-6;
                prop_assert!(within, "{admitted} admitted, bucket allows {allowed}");
            }
            prop_assert!(per_day.values().all(|n| *n <= quota), "{per_day:?} over {quota}");
            Ok(())
        })?;
    }
}
