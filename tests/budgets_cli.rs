//! `api-key-server budgets`, the operator's view of spend, through the real binary against
//! a real `redis-server` (single node, TLS, a three-master cluster): budget hashes written
//! by the library's own `RedisBudgets`, then read back as JSON and as a table.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use api_key_server::budget::redis::RedisBudgets;
use api_key_server::budget::{Nanos, ReservationIds, Scope};
use api_key_server::day::{Day, DayZone};
use api_key_server::server::install_crypto_provider;
use api_key_server::settings::{RedisSettings, Secret};
use api_key_server::store::Store;
use common::redis::{RedisCluster, RedisServer};
use common::{base_env, binary, set};
use serde_json::{Value, json};

const PREFIX: &str = "ops";
const ZONE: &str = "Asia/Tokyo";
/// A user id longer than 64 bytes: Redis keys hold its SHA-256 only.
const LONG_USER: &str = "a-very-long-user-id-0123456789-0123456789-0123456789-0123456789-0123456789";

/// USD in 1e-9 units.
const fn usd_nanos(nanos: u64) -> Nanos {
    Nanos(nanos)
}

fn now() -> i64 {
    i64::try_from(common::now()).unwrap()
}

fn today() -> Day {
    DayZone::new(ZONE).unwrap().day_at(now())
}

/// The server's settings for these tests: budgets for every kind of scope, every
/// callable model priced, and Redis at `url`.
fn env(url: Option<&str>, cluster: bool) -> HashMap<String, String> {
    let mut env = base_env("http://127.0.0.1:9/v1/chat/completions");
    set(
        &mut env,
        "MODEL_PRICES",
        &json!({
            "gpt-4o": {"input": 2.5, "output": 10},
            "gpt-4o-mini": {"input": 0.15, "output": 0.6},
            "text-embedding-3-small": {"input": 0.02},
            "text-embedding-3-large": {"input": 0.13},
        })
        .to_string(),
    );
    set(&mut env, "DAILY_BUDGET_USD", "1");
    set(
        &mut env,
        "PRODUCT_LIMITS",
        r#"{"other": {"daily_budget_usd": 0.5, "product_daily_budget_usd": 10}}"#,
    );
    set(&mut env, "CLIENT_LIMITS", r#"{"desk": {"daily_budget_usd": 3}}"#);
    set(&mut env, "DAY_TIMEZONE", ZONE);
    set(&mut env, "REDIS_PREFIX", PREFIX);
    if let Some(url) = url {
        set(&mut env, "REDIS_URL", url);
    }
    if cluster {
        set(&mut env, "REDIS_CLUSTER", "true");
    }
    env
}

async fn budgets_cli(env: &HashMap<String, String>, args: &[&str]) -> Output {
    let mut command = binary();
    command.arg("budgets").args(args).envs(env).stdin(Stdio::null());
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command ends")
        .expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "{}", stderr(output));
    serde_json::from_str(&stdout(output)).unwrap()
}

fn writer(url: &str, cluster: bool, ca_cert: Option<Vec<u8>>) -> RedisBudgets {
    install_crypto_provider();
    let store = Store::start(&RedisSettings {
        url: Secret::new(url.to_owned()),
        cluster,
        ca_cert,
        prefix: PREFIX.to_owned(),
        timeout: Duration::from_secs(2),
    });
    RedisBudgets::new(Arc::new(store), Duration::from_secs(3600))
}

fn user(product: &str, user: &str) -> Scope {
    Scope::User {
        product: product.into(),
        user: user.into(),
    }
}

/// Records requests as the proxy does: a reservation, then (unless `settled` is `None`)
/// its settlement at the actual cost. The budget given to `reserve` is never reached
/// here: these tests are about what the view shows, not about admission.
async fn spend(
    budgets: &RedisBudgets,
    ids: &ReservationIds,
    day: &Day,
    scope: &Scope,
    reserved: u64,
    settled: Option<u64>,
) {
    let id = ids.next();
    let t = now();
    let decision = budgets
        .reserve(scope, Nanos::MAX, &id, usd_nanos(reserved), day, t)
        .await
        .expect("Redis answers");
    assert!(decision.is_admitted());
    if let Some(actual) = settled {
        budgets
            .settle(scope, &id, usd_nanos(actual), day, t)
            .await
            .expect("Redis answers");
    }
}

/// A day of spend: every kind of scope, settled and open reservations, a scope over its
/// budget, one without a budget, a long user id; and one scope on the next day.
async fn write_day(budgets: &RedisBudgets) {
    let ids = ReservationIds::with_instance("cli-test");
    let day = today();
    let next = DayZone::new(ZONE).unwrap().day_at(day.end);
    spend(
        budgets,
        &ids,
        &day,
        &Scope::Client("desk".into()),
        2_500_000_000,
        Some(2_000_000_000),
    )
    .await;
    // One request of `other`'s carol, counted in her scope and in the product's.
    spend(
        budgets,
        &ids,
        &day,
        &user("other", "carol"),
        900_000_000,
        Some(700_000_000),
    )
    .await;
    spend(
        budgets,
        &ids,
        &day,
        &Scope::Product("other".into()),
        900_000_000,
        Some(700_000_000),
    )
    .await;
    spend(
        budgets,
        &ids,
        &day,
        &user("demo", "alice"),
        400_000_000,
        Some(123_456_789),
    )
    .await;
    spend(budgets, &ids, &day, &user("demo", "bob"), 100_000_000, Some(50_000_000)).await;
    spend(budgets, &ids, &day, &user("demo", "bob"), 300_000_000, None).await;
    spend(
        budgets,
        &ids,
        &day,
        &user("demo", LONG_USER),
        30_000_000,
        Some(20_000_000),
    )
    .await;
    // The product `demo` has no product budget (spend may still be there, e.g. from a
    // time it had one).
    spend(
        budgets,
        &ids,
        &day,
        &Scope::Product("demo".into()),
        10_000_000,
        Some(10_000_000),
    )
    .await;
    spend(
        budgets,
        &ids,
        &next,
        &user("demo", "dave"),
        5_000_000_000,
        Some(5_000_000_000),
    )
    .await;
}

fn long_user_label() -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(LONG_USER.as_bytes())))
}

/// What `budgets --json` must print for the day [`write_day`] wrote, top spenders first.
fn expected_today() -> Value {
    let row = |kind: &str,
               product: Value,
               user: Value,
               client: Value,
               spent: &str,
               open: &str,
               budget: Value,
               left: Value| {
        json!({
            "kind": kind, "product": product, "user": user, "client": client,
            "spent_usd": spent, "open_usd": open, "budget_usd": budget, "left_usd": left,
        })
    };
    let null = Value::Null;
    json!([
        row(
            "client",
            null.clone(),
            null.clone(),
            json!("desk"),
            "2",
            "0",
            json!("3"),
            json!("1")
        ),
        // Equal spend: by kind, then by ids.
        row(
            "product",
            json!("other"),
            null.clone(),
            null.clone(),
            "0.7",
            "0",
            json!("10"),
            json!("9.3")
        ),
        // Over its budget (written without admission): left is 0, never negative.
        row(
            "user",
            json!("other"),
            json!("carol"),
            null.clone(),
            "0.7",
            "0",
            json!("0.5"),
            json!("0")
        ),
        row(
            "user",
            json!("demo"),
            json!("alice"),
            null.clone(),
            "0.123456789",
            "0",
            json!("1"),
            json!("0.876543211")
        ),
        row(
            "user",
            json!("demo"),
            json!("bob"),
            null.clone(),
            "0.05",
            "0.3",
            json!("1"),
            json!("0.65")
        ),
        row(
            "user",
            json!("demo"),
            json!(long_user_label()),
            null.clone(),
            "0.02",
            "0",
            json!("1"),
            json!("0.98")
        ),
        row(
            "product",
            json!("demo"),
            null.clone(),
            null.clone(),
            "0.01",
            "0",
            null.clone(),
            null
        ),
    ])
}

/// The JSON and the table for today (by default and by `--date`), the next day, and a
/// day without spend.
async fn assert_views(env: &HashMap<String, String>) {
    let day = today();
    let by_default = json_of(&budgets_cli(env, &["--json"]).await);
    assert_eq!(by_default, expected_today());
    let by_date = json_of(&budgets_cli(env, &["--json", "--date", &day.key()]).await);
    assert_eq!(by_date, expected_today());

    let next = DayZone::new(ZONE).unwrap().day_at(day.end).key();
    let tomorrow = json_of(&budgets_cli(env, &["--json", "--date", &next]).await);
    assert_eq!(
        tomorrow,
        json!([{"kind": "user", "product": "demo", "user": "dave", "client": null,
                "spent_usd": "5", "open_usd": "0", "budget_usd": "1", "left_usd": "0"}])
    );
    let empty = budgets_cli(env, &["--json", "--date", "2000-01-01"]).await;
    assert_eq!(json_of(&empty), json!([]));
    let empty = budgets_cli(env, &["--date", "2000-01-01"]).await;
    assert!(empty.status.success());
    assert!(
        stdout(&empty).contains("No budget spend recorded"),
        "{}",
        stdout(&empty)
    );

    let table = budgets_cli(env, &["--date", &day.key()]).await;
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(
        lines[0].join(" ").contains(&format!("Spend on {}", day.key())),
        "{text}"
    );
    assert_eq!(
        lines[1],
        [
            "KIND",
            "PRODUCT",
            "USER/CLIENT",
            "SPENT_USD",
            "OPEN_USD",
            "BUDGET_USD",
            "LEFT_USD"
        ]
    );
    assert_eq!(lines[2], ["client", "-", "desk", "2", "0", "3", "1"], "{text}");
    assert_eq!(lines[3], ["product", "other", "-", "0.7", "0", "10", "9.3"], "{text}");
    assert_eq!(lines[4], ["user", "other", "carol", "0.7", "0", "0.5", "0"], "{text}");
    assert_eq!(
        lines[5],
        ["user", "demo", "alice", "0.123456789", "0", "1", "0.876543211"]
    );
    assert_eq!(lines[6], ["user", "demo", "bob", "0.05", "0.3", "1", "0.65"]);
    assert_eq!(lines[7][2], long_user_label());
    assert_eq!(lines[8], ["product", "demo", "-", "0.01", "0", "-", "-"]);
    assert_eq!(lines.len(), 9, "{text}");
}

#[tokio::test]
async fn shows_the_days_spend_per_scope_with_budgets_top_spenders_first() {
    let redis = RedisServer::start();
    write_day(&writer(&redis.url(), false, None)).await;
    assert_views(&env(Some(&redis.url()), false)).await;
    // It only read: the keys are as they were.
    let before = redis.keys().len();
    budgets_cli(&env(Some(&redis.url()), false), &["--json"]).await;
    assert_eq!(redis.keys().len(), before);
}

#[tokio::test]
async fn reads_every_master_of_a_redis_cluster() {
    let cluster = RedisCluster::start();
    write_day(&writer(&cluster.url(), true, None)).await;
    // The scopes' keys are spread over the masters (slots are fixed by the tags), so a
    // view that read one node only would miss rows.
    let holding = cluster
        .nodes
        .iter()
        .filter(|node| node.keys().iter().any(|k| k.contains(":budget:")))
        .count();
    assert!(holding >= 2, "the test data sits on {holding} node(s)");
    assert_views(&env(Some(&cluster.url()), true)).await;
}

#[tokio::test]
async fn reads_redis_over_tls_with_the_ca_of_redis_ca_cert() {
    let redis = RedisServer::start_tls();
    let ca = redis.tls.as_ref().unwrap().ca_pem();
    write_day(&writer(&redis.url(), false, Some(ca.clone().into_bytes()))).await;
    let mut env = env(Some(&redis.url()), false);
    set(&mut env, "REDIS_CA_CERT", &ca);
    assert_views(&env).await;
}

#[tokio::test]
async fn stops_at_the_key_limit_and_says_so() {
    let redis = RedisServer::start();
    write_day(&writer(&redis.url(), false, None)).await;
    let output = budgets_cli(&env(Some(&redis.url()), false), &["--json", "--max-keys", "3"]).await;
    assert_eq!(json_of(&output).as_array().unwrap().len(), 3);
    assert!(
        stderr(&output).contains("stopped after 3 budget keys"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn without_redis_url_there_is_nothing_to_read() {
    let output = budgets_cli(&env(None, false), &[]).await;
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("API_KEY_SERVER_REDIS_URL is not set"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(stdout(&output).is_empty());
}

#[tokio::test]
async fn settings_and_arguments_errors_exit_2() {
    let mut bad = env(Some("redis://127.0.0.1:9"), false);
    set(&mut bad, "DAY_TIMEZONE", "Mars/Olympus");
    let output = budgets_cli(&bad, &[]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("configuration error"), "{}", stderr(&output));
    assert!(stderr(&output).contains("DAY_TIMEZONE"), "{}", stderr(&output));

    for date in ["2026-13-01", "20261207", "today"] {
        let output = budgets_cli(&env(Some("redis://127.0.0.1:9"), false), &["--date", date]).await;
        assert_eq!(output.status.code(), Some(2), "{date}");
        assert!(stderr(&output).contains("--date"), "{}", stderr(&output));
    }
}

#[tokio::test]
async fn redis_that_cannot_be_read_exits_1_without_the_password() {
    const PASSWORD: &str = "pw-SECRET-4c1f";
    let mut redis = RedisServer::start_with_password(PASSWORD);
    let url = redis.url();
    write_day(&writer(&url, false, None)).await;
    assert_eq!(
        json_of(&budgets_cli(&env(Some(&url), false), &["--json"]).await),
        expected_today()
    );

    // A wrong password, then Redis gone.
    let wrong = url.replace(PASSWORD, "pw-WRONG-77");
    for url in [wrong.as_str(), url.as_str()] {
        if url == redis.url() {
            redis.kill();
        }
        let output = budgets_cli(&env(Some(url), false), &["--json"]).await;
        assert_eq!(output.status.code(), Some(1));
        let err = stderr(&output);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("cannot read Redis at redis://127.0.0.1:{}", redis.port)),
            "{err}"
        );
        assert!(!err.contains("SECRET") && !err.contains("WRONG"), "{err}");
        assert!(stdout(&output).is_empty());
    }
}

#[tokio::test]
async fn an_answer_that_is_not_redis_is_reported_on_one_line() {
    let addr = common::raw_upstream(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
    let output = budgets_cli(&env(Some(&format!("redis://127.0.0.1:{}", addr.port())), false), &[]).await;
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot read Redis at redis://127.0.0.1:"), "{err}");
}
