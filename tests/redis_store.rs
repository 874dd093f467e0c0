//! The Redis store used directly: nonces, its status, and the limiter's fallback, against
//! a real `redis-server`.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use api_key_server::auth::Identity;
use api_key_server::limit::{LimitError, Limiter};
use api_key_server::server::install_crypto_provider;
use api_key_server::settings::{LimitSettings, Limits, RedisSettings, Secret};
use common::redis::{RedisServer, free_port};

fn settings(url: &str) -> RedisSettings {
    settings_with_timeout(url, Duration::from_millis(1000))
}

fn settings_with_timeout(url: &str, timeout: Duration) -> RedisSettings {
    RedisSettings {
        url: Secret::new(url.to_owned()),
        cluster: false,
        ca_cert: None,
        prefix: "storetest".to_owned(),
        timeout,
    }
}

fn limits(capacity: u32) -> LimitSettings {
    LimitSettings {
        default: Limits {
            capacity: capacity.try_into().unwrap(),
            refill_per_second: 0.001,
            daily_quota: 1000.try_into().unwrap(),
        },
        products: HashMap::new(),
        clients: HashMap::new(),
    }
}

fn alice() -> Identity {
    Identity {
        product: Arc::from("demo"),
        user: "alice".into(),
        client: None,
    }
}

#[tokio::test]
async fn a_nonce_is_claimed_once_per_client_and_expires() {
    install_crypto_provider();
    let redis = RedisServer::start();
    let store = api_key_server::store::Store::start(&settings(&redis.url()));
    let ttl = Duration::from_millis(300);
    assert_eq!(
        store.claim_nonce("desk", "nonce-0123456789abcdef", ttl).await,
        Some(true)
    );
    assert_eq!(
        store.claim_nonce("desk", "nonce-0123456789abcdef", ttl).await,
        Some(false)
    );
    assert_eq!(
        store.claim_nonce("other", "nonce-0123456789abcdef", ttl).await,
        Some(true)
    );
    assert!(store.is_using_redis());
    let pttl: i64 = redis
        .cli(&[
            "PTTL",
            "storetest:{c:x6465736b}:nonce:x6e6f6e63652d30313233343536373839616263646566",
        ])
        .parse()
        .unwrap();
    assert!(pttl > 0 && pttl <= 300, "PTTL {pttl}");
}

#[tokio::test]
async fn concurrent_nonce_claims_accept_exactly_one() {
    install_crypto_provider();
    let redis = RedisServer::start();
    let store = Arc::new(api_key_server::store::Store::start(&settings(&redis.url())));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .claim_nonce("desk", "same-nonce-abcdefgh", Duration::from_secs(60))
                    .await
            })
        })
        .collect();
    let mut fresh = 0;
    for task in tasks {
        match task.await.unwrap() {
            Some(true) => fresh += 1,
            Some(false) => {}
            None => panic!("Redis is up"),
        }
    }
    assert_eq!(fresh, 1);
}

#[tokio::test]
async fn an_unreachable_redis_answers_none_quickly_and_counts_errors() {
    install_crypto_provider();
    let store = api_key_server::store::Store::start(&settings(&format!("redis://127.0.0.1:{}", free_port())));
    let started = std::time::Instant::now();
    assert_eq!(
        store
            .claim_nonce("desk", "nonce-0123456789abcdef", Duration::from_secs(1))
            .await,
        None
    );
    // The breaker is open: the next ones do not wait at all.
    for _ in 0..10 {
        assert_eq!(
            store
                .claim_nonce("desk", "nonce-0123456789abcdef", Duration::from_secs(1))
                .await,
            None
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(!store.is_using_redis());
    assert!(store.error_count() >= 1);
}

#[tokio::test]
async fn the_limiter_decides_in_memory_while_redis_is_down_and_in_redis_once_back() {
    install_crypto_provider();
    let mut redis = RedisServer::start();
    let store = Arc::new(api_key_server::store::Store::start(&settings(&redis.url())));
    let limiter = Limiter::new(&limits(2), Some(store.clone()));
    assert!(limiter.admit(&alice()).await.is_ok());
    assert!(store.is_using_redis());
    assert_eq!(redis.keys().len(), 2);

    redis.kill();
    // A fresh bucket in memory: two admitted, then refused; never an error of Redis's.
    assert!(limiter.admit(&alice()).await.is_ok());
    assert!(limiter.admit(&alice()).await.is_ok());
    assert!(matches!(
        limiter.admit(&alice()).await,
        Err(LimitError::RateLimited { .. })
    ));
    assert!(!store.is_using_redis());

    redis.restart();
    // The breaker lets a probe through after a second; requests start it lazily.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !store.is_using_redis() {
        assert!(std::time::Instant::now() < deadline, "Redis not used again within 10 s");
        let _ = limiter.admit(&alice()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Redis is empty after its restart: a full bucket there.
    let grant = limiter.admit(&alice()).await.unwrap();
    assert_eq!(grant.headers.remaining, 1);
    assert_eq!(redis.keys().len(), 2);
}

#[tokio::test]
async fn a_redis_slower_than_the_timeout_is_skipped_and_used_again_once_it_answers() {
    install_crypto_provider();
    let redis = RedisServer::start();
    let store = Arc::new(api_key_server::store::Store::start(&settings_with_timeout(
        &redis.url(),
        Duration::from_millis(200),
    )));
    let limiter = Limiter::new(&limits(2), Some(store.clone()));
    assert!(limiter.admit(&alice()).await.is_ok());
    assert!(store.is_using_redis());

    redis.pause();
    let started = std::time::Instant::now();
    // The first waits the timeout, then memory decides (a fresh bucket there).
    assert!(limiter.admit(&alice()).await.is_ok());
    let first = started.elapsed();
    assert!(
        first >= Duration::from_millis(200) && first < Duration::from_millis(800),
        "{first:?}"
    );
    // The breaker is open: no more waiting.
    let started = std::time::Instant::now();
    assert!(limiter.admit(&alice()).await.is_ok());
    assert!(matches!(
        limiter.admit(&alice()).await,
        Err(LimitError::RateLimited { .. })
    ));
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert!(!store.is_using_redis());

    redis.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !store.is_using_redis() {
        assert!(std::time::Instant::now() < deadline, "Redis not used again within 15 s");
        let _ = limiter.admit(&alice()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Decided in Redis again: bob's keys appear there. (The request that timed out was
    // still run by Redis once it resumed, as a sent command cannot be unsent: Redis may
    // have charged alice for it too, which errs on the strict side.)
    let bob = Identity {
        user: "bob".into(),
        ..alice()
    };
    assert!(limiter.admit(&bob).await.is_ok());
    assert!(
        redis.keys().iter().any(|k| k.contains(":u:x626f62}:bucket")),
        "{:?}",
        redis.keys()
    );
}
