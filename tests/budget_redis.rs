//! Budgets in Redis against a real `redis-server`: exact under concurrency from two
//! instances, every step repeatable on the reservation id, expiry charged, keys under the
//! scope's hash tag with the contract's lifetime, amounts beyond a double's exact range.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::time::Duration;

use api_key_server::budget::redis::RedisBudgets;
use api_key_server::budget::{Decision, Nanos, ReservationIds, Scope, Settlement, Spend};
use api_key_server::day::DayZone;
use api_key_server::server::install_crypto_provider;
use api_key_server::settings::{RedisSettings, Secret};
use api_key_server::store::Store;
use common::redis::{RedisCluster, RedisServer};

const TTL: Duration = Duration::from_secs(3600);

fn budgets(url: &str, cluster: bool) -> RedisBudgets {
    let store = Store::start(&RedisSettings {
        url: Secret::new(url.to_owned()),
        cluster,
        ca_cert: None,
        prefix: "bt".to_owned(),
        timeout: Duration::from_secs(2),
    });
    RedisBudgets::new(Arc::new(store), TTL)
}

fn user(name: &str) -> Scope {
    Scope::User {
        product: "demo".into(),
        user: name.into(),
    }
}

/// The wall clock: Redis expires keys by its own clock, so a day in the past would
/// expire at once. Within a test, later moments are `now() + n` (the budget's clock).
fn now() -> i64 {
    i64::try_from(common::now()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_reserving_concurrently_never_pass_the_budget() {
    install_crypto_provider();
    let t = now();
    let today = DayZone::utc().day_at(t);
    let redis = RedisServer::start();
    let instances = [
        Arc::new(budgets(&redis.url(), false)),
        Arc::new(budgets(&redis.url(), false)),
    ];
    let ids = [
        Arc::new(ReservationIds::with_instance("a")),
        Arc::new(ReservationIds::with_instance("b")),
    ];
    let scope = user("alice");
    let budget = Nanos(1_000);
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let (budgets, ids, scope) = (instances[n % 2].clone(), ids[n % 2].clone(), scope.clone());
            tokio::spawn(async move {
                budgets
                    .reserve(&scope, budget, &ids.next(), Nanos(7), &today, t)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        if task.await.unwrap().is_admitted() {
            admitted += 1;
        }
    }
    // 142 × 7 = 994 <= 1000 < 143 × 7: exactly as many as fit, whatever the interleaving.
    assert_eq!(admitted, 142);
    assert_eq!(
        instances[0].spend(&scope, &today, t).await,
        Some(Spend {
            spent: Nanos(0),
            open: Nanos(994)
        })
    );
}

#[tokio::test]
async fn reserve_and_settle_repeat_without_counting_twice() {
    install_crypto_provider();
    let t = now();
    let today = DayZone::utc().day_at(t);
    let redis = RedisServer::start();
    let budgets = budgets(&redis.url(), false);
    let ids = ReservationIds::with_instance("i");
    let (scope, day) = (user("bob"), today);
    let id = ids.next();
    let first = budgets.reserve(&scope, Nanos(100), &id, Nanos(40), &day, t).await;
    assert_eq!(
        first,
        Some(Decision::Admitted {
            remaining_before: Nanos(100)
        })
    );
    // A repeat (say, after a timeout that hid a success) answers the same, adds nothing.
    assert_eq!(
        budgets.reserve(&scope, Nanos(100), &id, Nanos(40), &day, t).await,
        first
    );
    assert_eq!(
        budgets.spend(&scope, &day, t).await,
        Some(Spend {
            spent: Nanos(0),
            open: Nanos(40)
        })
    );
    assert_eq!(
        budgets
            .reserve(&scope, Nanos(100), &ids.next(), Nanos(61), &day, t)
            .await,
        Some(Decision::Refused { remaining: Nanos(60) })
    );
    assert_eq!(
        budgets.settle(&scope, &id, Nanos(15), &day, t).await,
        Some(Settlement::Settled)
    );
    assert_eq!(
        budgets.settle(&scope, &id, Nanos(15), &day, t).await,
        Some(Settlement::Unknown)
    );
    assert_eq!(
        budgets.settle(&scope, &id, Nanos(99), &day, t + 1).await,
        Some(Settlement::Unknown)
    );
    // Repeated after its settlement, the reservation still counts nothing.
    assert!(
        budgets
            .reserve(&scope, Nanos(100), &id, Nanos(40), &day, t)
            .await
            .unwrap()
            .is_admitted()
    );
    assert_eq!(
        budgets.spend(&scope, &day, t).await,
        Some(Spend {
            spent: Nanos(15),
            open: Nanos(0)
        })
    );
    // Settling an id never reserved does nothing.
    assert_eq!(
        budgets.settle(&scope, &ids.next(), Nanos(5), &day, t).await,
        Some(Settlement::Unknown)
    );
    assert_eq!(budgets.spend(&scope, &day, t).await.unwrap().spent, Nanos(15));
}

#[tokio::test]
async fn an_unsettled_reservation_is_charged_after_the_window_and_a_late_settlement_replaces_it() {
    install_crypto_provider();
    let t = now();
    let today = DayZone::utc().day_at(t);
    let redis = RedisServer::start();
    // The instance that reserved is gone; another one finds the reservation expired.
    let gone = budgets(&redis.url(), false);
    let other = budgets(&redis.url(), false);
    let (scope, day) = (user("carol"), today);
    let id = ReservationIds::with_instance("gone").next();
    gone.reserve(&scope, Nanos(100), &id, Nanos(30), &day, t).await.unwrap();
    drop(gone);
    assert_eq!(
        other.spend(&scope, &day, t + 3599).await,
        Some(Spend {
            spent: Nanos(0),
            open: Nanos(30)
        })
    );
    assert_eq!(
        other.spend(&scope, &day, t + 3600).await,
        Some(Spend {
            spent: Nanos(30),
            open: Nanos(0)
        })
    );
    assert_eq!(other.expired_charged(), 1);
    // Charged once: later looks charge nothing more.
    assert_eq!(other.spend(&scope, &day, t + 4000).await.unwrap().spent, Nanos(30));
    // The stream outlived the window and ends now: its actual cost replaces the charge.
    assert_eq!(
        other.settle(&scope, &id, Nanos(8), &day, t + 4000).await,
        Some(Settlement::ReplacedCharge)
    );
    assert_eq!(
        other.spend(&scope, &day, t + 4000).await,
        Some(Spend {
            spent: Nanos(8),
            open: Nanos(0)
        })
    );
    assert_eq!(
        other.settle(&scope, &id, Nanos(8), &day, t + 4001).await,
        Some(Settlement::Unknown)
    );
}

#[tokio::test]
async fn keys_sit_under_the_scope_hash_tag_and_outlive_the_day_by_the_window_plus_an_hour() {
    install_crypto_provider();
    let t = now();
    let redis = RedisServer::start();
    let budgets = budgets(&redis.url(), false);
    let zone = DayZone::new("Asia/Tokyo").unwrap();
    let day = zone.day_at(t);
    let id = ReservationIds::with_instance("k").next();
    budgets
        .reserve(&Scope::Product("demo".into()), Nanos(10), &id, Nanos(1), &day, t)
        .await
        .unwrap();
    let mut keys = redis.keys();
    keys.sort();
    let hash = format!("bt:{{p:x64656d6f}}:budget:{}", day.key());
    assert_eq!(keys, [hash.clone(), format!("{hash}:due")]);
    let expected = (day.end + 3600 + 3600).to_string();
    for key in &keys {
        assert_eq!(redis.cli(&["EXPIRETIME", key]), expected, "{key}");
    }
}

#[tokio::test]
async fn amounts_beyond_a_doubles_exact_range_are_compared_exactly() {
    install_crypto_provider();
    let t = now();
    let today = DayZone::utc().day_at(t);
    let redis = RedisServer::start();
    let budgets = budgets(&redis.url(), false);
    let ids = ReservationIds::with_instance("big");
    let (scope, day) = (Scope::Client("desk".into()), today);
    // 2^53 + 1 is the first integer a double cannot hold; the budget is 1e18 nanos.
    let budget = Nanos(1_000_000_000_000_000_000);
    let big = Nanos((1 << 53) + 1);
    let first = ids.next();
    assert!(
        budgets
            .reserve(&scope, budget, &first, big, &day, t)
            .await
            .unwrap()
            .is_admitted()
    );
    let rest = Nanos(budget.0 - big.0);
    // One nano more than what is left is refused; exactly what is left is admitted.
    assert_eq!(
        budgets
            .reserve(&scope, budget, &ids.next(), Nanos(rest.0 + 1), &day, t)
            .await,
        Some(Decision::Refused { remaining: rest })
    );
    assert_eq!(
        budgets.reserve(&scope, budget, &ids.next(), rest, &day, t).await,
        Some(Decision::Admitted { remaining_before: rest })
    );
    budgets.settle(&scope, &first, Nanos(1), &day, t).await.unwrap();
    assert_eq!(
        budgets.spend(&scope, &day, t).await,
        Some(Spend {
            spent: Nanos(1),
            open: rest
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_work_on_redis_cluster() {
    install_crypto_provider();
    let t = now();
    let today = DayZone::utc().day_at(t);
    let cluster = RedisCluster::start();
    let budgets = budgets(&cluster.url(), true);
    let ids = ReservationIds::with_instance("c");
    let day = today;
    // Scopes spread over the cluster's slots; each call's two keys share one slot.
    for n in 0..20 {
        let scope = user(&format!("user-{n}"));
        let id = ids.next();
        assert!(
            budgets
                .reserve(&scope, Nanos(10), &id, Nanos(10), &day, t)
                .await
                .unwrap()
                .is_admitted()
        );
        assert!(
            !budgets
                .reserve(&scope, Nanos(10), &ids.next(), Nanos(1), &day, t)
                .await
                .unwrap()
                .is_admitted()
        );
        assert_eq!(
            budgets.settle(&scope, &id, Nanos(4), &day, t).await,
            Some(Settlement::Settled)
        );
        assert_eq!(
            budgets.spend(&scope, &day, t).await,
            Some(Spend {
                spent: Nanos(4),
                open: Nanos(0)
            })
        );
    }
    assert_eq!(cluster.keys().len(), 40);
}

#[tokio::test]
async fn spend_made_during_an_outage_is_added_once_even_when_the_replay_repeats() {
    use api_key_server::budget::outage::{Outage, Share};

    install_crypto_provider();
    let t = now();
    let today = DayZone::utc().day_at(t);
    let redis = RedisServer::start();
    let budgets = budgets(&redis.url(), false);
    let ids = ReservationIds::with_instance("o");
    let (scope, day) = (user("dave"), today);
    let before = ids.next();
    let decision = budgets
        .reserve(&scope, Nanos(1000), &before, Nanos(100), &day, t)
        .await
        .unwrap();
    let mut outage = Outage::new(Share::parse("0.1").unwrap(), 3600);
    outage.note_read(&scope, &day, decision.remaining().saturating_sub(Nanos(100)), t);
    // Redis is away: this instance admits up to 10% of the 900 left (90).
    let during = ids.next();
    assert!(
        outage
            .reserve(&scope, Nanos(1000), &during, Nanos(90), &day, t + 5)
            .is_admitted()
    );
    assert!(
        !outage
            .reserve(&scope, Nanos(1000), &ids.next(), Nanos(1), &day, t + 5)
            .is_admitted()
    );
    assert!(outage.settle(&during, Nanos(60)));
    // Back: the replay is written, and written again (as after a timeout), counting once.
    outage.redis_back();
    let replays = outage.take_replays(t + 10);
    assert_eq!(replays.len(), 1);
    for _ in 0..2 {
        budgets.replay(&replays[0], t + 10).await.unwrap();
    }
    assert_eq!(
        budgets.spend(&scope, &day, t + 10).await,
        Some(Spend {
            spent: Nanos(60),
            open: Nanos(100)
        })
    );
}

#[tokio::test]
async fn a_refused_requests_late_reservation_is_released_in_whichever_order_it_arrives() {
    use api_key_server::budget::outage::{Outage, Share};

    install_crypto_provider();
    let t = now();
    let day = DayZone::utc().day_at(t);
    let redis = RedisServer::start();
    let budgets = budgets(&redis.url(), false);
    let ids = ReservationIds::with_instance("v");
    let scope = user("erin");
    // Two requests whose reservation calls did not answer in time and were then refused
    // by the outage rule: one call reaches Redis before the release, one after.
    let (early, late) = (ids.next(), ids.next());
    let mut outage = Outage::new(Share::parse("0.1").unwrap(), 3600);
    outage.void(&scope, &early, Nanos(70), &day);
    outage.void(&scope, &late, Nanos(80), &day);
    assert!(outage.awaits_replay());
    assert_eq!(outage.unreplayed(), Nanos::ZERO);

    assert!(
        budgets
            .reserve(&scope, Nanos(1000), &early, Nanos(70), &day, t)
            .await
            .unwrap()
            .is_admitted()
    );
    let replays = outage.take_replays(t + 1);
    assert_eq!(replays.len(), 2);
    assert!(!outage.awaits_replay());
    for replay in &replays {
        assert_eq!(replay.cost, Nanos::ZERO);
        budgets.replay(replay, t + 1).await.unwrap();
    }
    // The late call runs after its release: it reserves nothing.
    assert!(
        budgets
            .reserve(&scope, Nanos(1000), &late, Nanos(80), &day, t + 2)
            .await
            .unwrap()
            .is_admitted()
    );
    assert_eq!(budgets.spend(&scope, &day, t + 2).await, Some(Spend::default()));
}

#[tokio::test]
async fn an_unreachable_redis_answers_none_so_the_caller_applies_the_outage_rule() {
    install_crypto_provider();
    let t = now();
    let today = DayZone::utc().day_at(t);
    let port = common::redis::free_port();
    let budgets = budgets(&format!("redis://127.0.0.1:{port}"), false);
    let id = ReservationIds::with_instance("down").next();
    let scope = user("erin");
    assert_eq!(budgets.reserve(&scope, Nanos(10), &id, Nanos(1), &today, t).await, None);
    assert_eq!(budgets.settle(&scope, &id, Nanos(1), &today, t).await, None);
    assert_eq!(budgets.spend(&scope, &today, t).await, None);
}
