//! One request's way through its budgets: admission in every budgeted scope (client,
//! product, user, in the contract's order), and settlement when the response ends.
//!
//! Where each scope decides: Redis when configured and answering ([`RedisBudgets`]);
//! the outage ledger while a configured Redis is unavailable ([`Outage`]: a share of what
//! was left, replayed into Redis once it is back); this instance's memory when no Redis
//! is configured ([`MemoryBudgets`]). A settlement that Redis cannot take now is kept and
//! made again later (repeating one never counts twice); until then the reservation counts
//! as open, and is charged in full if it expires first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::memory::MemoryBudgets;
use super::outage::Outage;
use super::redis::{Folded, FoldedAnswer, RedisBudgets};
use super::{Decision, Nanos, ReservationId, ReservationIds, Scope};
use crate::auth::Identity;
use crate::clock::Clock;
use crate::day::{Day, DayCache, DayZone};
use crate::lock::lock;
use crate::settings::BudgetSettings;
use crate::store::Store;

const X_BUDGET_LIMIT: HeaderName = HeaderName::from_static("x-budget-limit-usd");
const X_BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-budget-remaining-usd");

/// Most settlements kept while Redis cannot take them; beyond it the oldest is dropped,
/// and its reservation is charged in full when it expires (an overcharge, never a leak).
const MAX_LATE_SETTLEMENTS: usize = 100_000;

/// Where the decisions were taken: the log line's `budget_store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetStore {
    Redis,
    Memory,
}

impl BudgetStore {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redis => "redis",
            Self::Memory => "memory",
        }
    }
}

/// Where one scope's reservation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Redis,
    Outage,
    Memory,
}

/// The caller's (product, user) budget as the `x-budget-*` headers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetHeaders {
    pub limit: Nanos,
    /// Budget - spend - open reservations before this request, never below 0.
    pub remaining: Nanos,
}

impl BudgetHeaders {
    pub fn write(&self, headers: &mut HeaderMap) {
        // Digits and a dot: always a valid header value.
        if let Ok(limit) = HeaderValue::try_from(self.limit.usd_6_up()) {
            headers.insert(X_BUDGET_LIMIT, limit);
        }
        if let Ok(remaining) = HeaderValue::try_from(self.remaining.usd_6_down()) {
            headers.insert(X_BUDGET_REMAINING, remaining);
        }
    }
}

/// An admitted request's reservations, to settle when its response ends.
#[derive(Debug)]
pub struct Admission {
    id: ReservationId,
    day: Day,
    /// The reservation (the worst case), the same in every scope.
    pub amount: Nanos,
    scopes: Vec<(Scope, Place)>,
    pub headers: Option<BudgetHeaders>,
    pub store: BudgetStore,
}

/// A request's budget admission, prepared before its limits: its id, its day and its
/// budgeted scopes, and, when the caller's (product, user) scope is the only budgeted one
/// and Redis is configured, that scope's reservation for the limiter to make in its own
/// Redis call (one round trip for the limits and the budget).
pub struct Prepared {
    id: ReservationId,
    day: Day,
    now: i64,
    amount: Nanos,
    /// Client, product, user: the contract's order.
    scopes: [Option<(Scope, Nanos)>; 3],
    folded: Option<Folded>,
}

impl Prepared {
    /// The reservation the limiter's Redis call makes, if any.
    pub fn folded(&self) -> Option<&Folded> {
        self.folded.as_ref()
    }
}

/// A request refused by a budget (429 `budget_exceeded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// `user`, `product` or `client`.
    pub scope: &'static str,
    /// Until the next day starts in `DAY_TIMEZONE`.
    pub retry_after: Duration,
    pub headers: Option<BudgetHeaders>,
    pub store: BudgetStore,
}

/// The caller's (product, user) scope.
fn user_scope(identity: &Identity) -> Scope {
    Scope::User {
        product: Arc::clone(&identity.product),
        user: Arc::clone(&identity.user),
    }
}

/// A settlement Redis could not take when it was made.
struct Late {
    scope: Scope,
    id: ReservationId,
    cost: Nanos,
    day: Day,
}

/// Every budget of this instance; cheap to clone (one shared state).
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<Inner>,
}

struct Inner {
    settings: BudgetSettings,
    /// The day in `DAY_TIMEZONE`, worked out once per day rather than per request.
    days: DayCache,
    clock: Clock,
    ids: ReservationIds,
    memory: MemoryBudgets,
    redis: Option<RedisBudgets>,
    outage: Mutex<Outage>,
    late: Mutex<VecDeque<Late>>,
    /// One replay task at a time.
    replaying: AtomicBool,
}

impl Budgets {
    /// `store`: the Redis connection when `REDIS_URL` is set.
    pub fn new(settings: &BudgetSettings, zone: DayZone, clock: Clock, store: Option<Arc<Store>>) -> Self {
        let ttl = settings.reservation_ttl;
        let ids = ReservationIds::new();
        Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                days: DayCache::new(zone),
                ids,
                memory: MemoryBudgets::in_process(ttl),
                redis: store.map(|store| RedisBudgets::new(store, ttl)),
                outage: Mutex::new(Outage::new(
                    settings.outage_share,
                    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 4),
                )),
                late: Mutex::new(VecDeque::new()),
                replaying: AtomicBool::new(false),
                clock,
            }),
        }
    }

    pub fn settings(&self) -> &BudgetSettings {
        &self.inner.settings
    }

    /// Whether a budget applies to `identity`'s requests.
    pub fn applies(&self, identity: &Identity) -> bool {
        self.inner
            .settings
            .applies(&identity.product, identity.client.as_deref())
    }

    fn now(&self) -> i64 {
        // Whole seconds since 1970: far inside i64.
        i64::try_from(self.inner.clock.wall().as_secs()).unwrap_or(i64::MAX)
    }

    /// The request's budget admission, prepared before its limits (see [`Prepared`]);
    /// `None` when no budget applies to `identity`.
    pub fn prepare(&self, identity: &Identity, amount: Nanos) -> Option<Prepared> {
        let settings = &self.inner.settings;
        let client = identity
            .client
            .as_ref()
            .and_then(|client| Some((Scope::Client(Arc::clone(client)), settings.client_budget(client)?)));
        let product = settings
            .product_budget(&identity.product)
            .map(|budget| (Scope::Product(Arc::clone(&identity.product)), budget));
        let user = settings
            .user_budget(&identity.product)
            .map(|budget| (user_scope(identity), budget));
        let count = usize::from(client.is_some()) + usize::from(product.is_some()) + usize::from(user.is_some());
        if count == 0 {
            return None;
        }
        let now = self.now();
        let day = self.inner.days.days_at(now).today;
        let id = self.inner.ids.next();
        let folded = match (&self.inner.redis, &user) {
            (Some(redis), Some((scope, budget))) if count == 1 => {
                Some(redis.fold(scope, *budget, &id.in_scope(scope), amount, &day, now))
            }
            _ => None,
        };
        Some(Prepared {
            id,
            day,
            now,
            amount,
            scopes: [client, product, user],
            folded,
        })
    }

    /// Reserves the prepared amount in every budgeted scope, client first, then the
    /// product, then the user; `folded`: the user scope's answer when the limiter's Redis
    /// call made its reservation ([`Prepared::folded`]). A refusal releases what this
    /// request reserved already.
    pub async fn admit(
        &self,
        identity: &Identity,
        prepared: Prepared,
        mut folded: Option<FoldedAnswer>,
    ) -> Result<Admission, Refusal> {
        let Prepared {
            id,
            day,
            now,
            amount,
            scopes,
            ..
        } = prepared;
        let user_budget = scopes[2].as_ref().map(|(_, budget)| *budget);
        let mut admission = Admission {
            id,
            day,
            amount,
            scopes: Vec::with_capacity(scopes.iter().flatten().count()),
            headers: None,
            store: BudgetStore::Redis,
        };
        for (scope, budget) in scopes.into_iter().flatten() {
            let scope_id = admission.id.in_scope(&scope);
            let answered = match (&self.inner.redis, &scope, folded.take()) {
                (Some(redis), Scope::User { .. }, Some(answer)) => Some(redis.answer(answer)),
                _ => None,
            };
            let (decision, place) = match answered {
                Some(decision) => (self.redis_decided(&scope, decision, amount, &day, now), Place::Redis),
                None => self.reserve(&scope, budget, &scope_id, amount, &day, now).await,
            };
            if place != Place::Redis {
                admission.store = BudgetStore::Memory;
            }
            let is_user = matches!(scope, Scope::User { .. });
            if is_user {
                admission.headers = Some(BudgetHeaders {
                    limit: budget,
                    remaining: decision.remaining(),
                });
            }
            crate::metrics::budget_decision(decision.is_admitted(), admission.store.as_str());
            if !decision.is_admitted() && place == Place::Outage {
                // The Redis call that did not answer may still run and reserve.
                lock(&self.inner.outage).void(&scope, &scope_id, amount, &day);
            }
            if !decision.is_admitted() {
                let headers = match (admission.headers, user_budget) {
                    (Some(headers), _) => Some(headers),
                    (None, Some(limit)) => Some(self.user_headers(identity, limit, &day, now).await),
                    (None, None) => None,
                };
                let store = admission.store;
                self.settle(admission, Nanos::ZERO).await;
                return Err(Refusal {
                    scope: scope.kind(),
                    retry_after: self.inner.days.zone().until_next_day(now),
                    headers,
                    store,
                });
            }
            admission.scopes.push((scope, place));
        }
        Ok(admission)
    }

    /// Settles `admission` at once when none of its reservations is in Redis (memory and
    /// the outage ledger need no waiting); else gives it back, for [`Self::settle`].
    #[must_use]
    pub fn settle_locally(&self, admission: Admission, cost: Nanos) -> Option<Admission> {
        if admission.scopes.iter().any(|(_, place)| *place == Place::Redis) {
            return Some(admission);
        }
        let now = self.now();
        for (scope, place) in &admission.scopes {
            let scoped = admission.id.in_scope(scope);
            if *place == Place::Memory {
                self.inner.memory.settle(scope, &scoped, cost, &admission.day, now);
            } else {
                lock(&self.inner.outage).settle(&scoped, cost);
            }
        }
        None
    }

    /// Replaces the reservations of `admission` with `cost` (0 releases them).
    pub async fn settle(&self, admission: Admission, cost: Nanos) {
        let now = self.now();
        let Admission { id, day, scopes, .. } = admission;
        for (scope, place) in scopes {
            let scoped = id.in_scope(&scope);
            match place {
                Place::Memory => {
                    self.inner.memory.settle(&scope, &scoped, cost, &day, now);
                }
                Place::Outage => {
                    lock(&self.inner.outage).settle(&scoped, cost);
                }
                Place::Redis => {
                    let settled = match &self.inner.redis {
                        Some(redis) => redis.settle(&scope, &scoped, cost, &day, now).await,
                        None => None,
                    };
                    if settled.is_some() {
                        self.redis_answered();
                    } else {
                        self.keep_late(Late {
                            scope,
                            id: scoped,
                            cost,
                            day,
                        });
                    }
                }
            }
        }
    }

    /// Settles `admission` on a task of its own: for a response dropped before its end,
    /// where nothing can wait for Redis.
    pub fn settle_later(&self, admission: Admission, cost: Nanos) {
        let Some(admission) = self.settle_locally(admission, cost) else {
            return;
        };
        let budgets = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { budgets.settle(admission, cost).await });
        }
    }

    /// Outage spend not yet written to Redis: lost if the instance stops now (logged and
    /// counted at shutdown).
    pub fn unreplayed(&self) -> Nanos {
        lock(&self.inner.outage).unreplayed()
    }

    /// Settlements Redis did not take yet: if the instance stops now, their reservations
    /// are charged in full when they expire (more than was spent, never less).
    pub fn unsettled(&self) -> usize {
        lock(&self.inner.late).len()
    }

    async fn reserve(
        &self,
        scope: &Scope,
        budget: Nanos,
        id: &ReservationId,
        amount: Nanos,
        day: &Day,
        now: i64,
    ) -> (Decision, Place) {
        let Some(redis) = &self.inner.redis else {
            let decision = self
                .inner
                .memory
                .reserve(scope, budget, id, amount, day, now)
                // Full (a million scopes or reservations today): fail closed.
                .unwrap_or(Decision::Refused { remaining: Nanos::ZERO });
            return (decision, Place::Memory);
        };
        let Some(decision) = redis.reserve(scope, budget, id, amount, day, now).await else {
            let decision = lock(&self.inner.outage).reserve(scope, budget, id, amount, day, now);
            return (decision, Place::Outage);
        };
        (self.redis_decided(scope, decision, amount, day, now), Place::Redis)
    }

    /// Redis decided `scope`: what was left there is noted for an outage, and what waits
    /// for Redis is written now that it answers.
    fn redis_decided(&self, scope: &Scope, decision: Decision, amount: Nanos, day: &Day, now: i64) -> Decision {
        let left = match decision {
            Decision::Admitted { remaining_before } => remaining_before.saturating_sub(amount),
            Decision::Refused { remaining } => remaining,
        };
        {
            let mut outage = lock(&self.inner.outage);
            outage.redis_back();
            outage.note_read(scope, day, left, now);
        }
        self.redis_answered();
        decision
    }

    /// The user's figures when an earlier scope refused the request.
    async fn user_headers(&self, identity: &Identity, limit: Nanos, day: &Day, now: i64) -> BudgetHeaders {
        let scope = user_scope(identity);
        let spend = match &self.inner.redis {
            None => Some(self.inner.memory.spend(&scope, day, now)),
            Some(redis) => redis.spend(&scope, day, now).await,
        };
        BudgetHeaders {
            limit,
            // Unknown while Redis is away: the budget is all that can be said.
            remaining: spend.map_or(limit, |s| s.remaining(limit)),
        }
    }

    fn keep_late(&self, late: Late) {
        let mut queue = lock(&self.inner.late);
        if queue.len() >= MAX_LATE_SETTLEMENTS {
            queue.pop_front();
            tracing::warn!("too many settlements wait for Redis: the oldest one's reservation will be charged in full");
        }
        queue.push_back(late);
    }

    /// Redis answered: write what waits for it (outage spend, late settlements) on a task
    /// of its own, one at a time.
    fn redis_answered(&self) {
        let waiting = !lock(&self.inner.late).is_empty() || lock(&self.inner.outage).awaits_replay();
        if !waiting || self.inner.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let budgets = self.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                budgets.replay().await;
                budgets.inner.replaying.store(false, Ordering::Release);
            });
        } else {
            self.inner.replaying.store(false, Ordering::Release);
        }
    }

    async fn replay(&self) {
        let Some(redis) = &self.inner.redis else { return };
        let now = self.now();
        let replays = lock(&self.inner.outage).take_replays(now);
        let mut replays = replays.into_iter();
        while let Some(replay) = replays.next() {
            if redis.replay(&replay, now).await.is_some() {
                crate::metrics::budget_outage_spend("replayed", replay.cost.0);
                continue;
            }
            // Redis went away again: keep the rest for the next time it answers.
            let mut outage = lock(&self.inner.outage);
            outage.give_back(replay);
            for rest in replays {
                outage.give_back(rest);
            }
            return;
        }
        loop {
            let Some(late) = lock(&self.inner.late).pop_front() else {
                return;
            };
            if redis
                .settle(&late.scope, &late.id, late.cost, &late.day, now)
                .await
                .is_none()
            {
                lock(&self.inner.late).push_front(late);
                return;
            }
        }
    }
}
