//! Budgets in Redis, shared exactly by every instance: one atomic script per scope
//! decision (`reserve.lua`) and one per settlement (`settle.lua`), each one round trip.
//!
//! Keys, under the scope's hash tag (so one call's keys share a Redis Cluster slot):
//! `<prefix>:{<tag>}:budget:<day>` (a hash: spend, open, the reservations by id) and
//! `<prefix>:{<tag>}:budget:<day>:due` (a sorted set of expiry times). Both expire
//! `BUDGET_RESERVATION_SECONDS` + 1 hour after the day ends. Amounts travel as integer
//! strings and are summed by `HINCRBY` (exact 64-bit); the scripts never do arithmetic on
//! large amounts as Lua doubles (see `common.lua`).
//!
//! The connection, timeout and fallback belong to [`Store`]: `None` means Redis is
//! unavailable and the caller applies the outage rule ([`super::outage`]). Every call is
//! repeatable on the reservation id, so a call that timed out (and may have happened) can
//! be made again without counting twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::outage::Replay;
use super::{Decision, Nanos, ReservationId, Scope, Settlement, Spend};
use crate::day::Day;
use crate::store::Store;

/// Keys outlive their day by the reservation window plus this margin (clock skew).
const DAY_MARGIN_SECONDS: i64 = 3600;

macro_rules! script {
    ($file:literal) => {
        redis::Script::new(concat!(include_str!("common.lua"), include_str!($file)))
    };
}

/// A reservation id goes to the scripts as its text, written straight into the command.
impl redis::ToRedisArgs for &ReservationId {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        out.write_arg_fmt(self);
    }
}

/// A (product, user) reservation made inside the limiter's Redis call when that scope is
/// the request's only budgeted one: the limits and the budget decided in one round trip
/// (`fold.lua`). The limiter runs `reserve.lua` on these keys and arguments only when its
/// limits admit the request.
pub struct Folded {
    hash: String,
    due: String,
    id: ReservationId,
    amount: Nanos,
    budget: Nanos,
    now: i64,
    expires_at: i64,
    keep_until: i64,
}

impl Folded {
    /// Appends `reserve.lua`'s keys and arguments (`KEYS[4..5]`, `ARGV[6..11]` of
    /// `fold.lua`).
    pub fn add_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation
            .key(&self.hash)
            .key(&self.due)
            .arg(&self.id)
            .arg(self.amount.0)
            .arg(self.budget.0)
            .arg(self.now)
            .arg(self.expires_at)
            .arg(self.keep_until);
    }
}

/// `reserve.lua`'s answer: the decision and how many expired reservations it charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldedAnswer {
    decision: Decision,
    expired: u64,
}

impl FoldedAnswer {
    /// From the script's `{admitted 0/1, remaining (decimal text), expired charged}`.
    pub fn read(admitted: i64, remaining: &str, expired: u64) -> Option<Self> {
        let remaining = Nanos(remaining.parse().ok()?);
        let decision = if admitted == 1 {
            Decision::Admitted {
                remaining_before: remaining,
            }
        } else {
            Decision::Refused { remaining }
        };
        Some(Self { decision, expired })
    }
}

/// See the module documentation.
pub struct RedisBudgets {
    store: Arc<Store>,
    reserve: redis::Script,
    settle: redis::Script,
    read: redis::Script,
    ttl: i64,
    expired: AtomicU64,
}

impl RedisBudgets {
    /// `reservation_ttl`: `BUDGET_RESERVATION_SECONDS`.
    pub fn new(store: Arc<Store>, reservation_ttl: Duration) -> Self {
        Self {
            store,
            reserve: script!("reserve.lua"),
            settle: script!("settle.lua"),
            read: script!("read.lua"),
            ttl: i64::try_from(reservation_ttl.as_secs()).unwrap_or(i64::MAX / 4),
            expired: AtomicU64::new(0),
        }
    }

    /// The reservation of [`Self::reserve`], to be made inside the limiter's call
    /// ([`Folded`]).
    pub fn fold(&self, scope: &Scope, budget: Nanos, id: &ReservationId, amount: Nanos, day: &Day, now: i64) -> Folded {
        let (hash, due) = self.keys(scope, day);
        Folded {
            hash,
            due,
            id: id.clone(),
            amount,
            budget,
            now,
            expires_at: now.saturating_add(self.ttl),
            keep_until: self.keep_until(day),
        }
    }

    /// What `reserve.lua` answered, counted as [`Self::reserve`] counts it.
    pub fn answer(&self, folded: FoldedAnswer) -> Decision {
        self.note_expired(folded.expired);
        folded.decision
    }

    /// Reserves `amount` for request `id` in `scope` on `day` if spend, open reservations
    /// and `amount` together fit `budget`; `now` is this instance's clock, unix seconds.
    /// `None`: Redis unavailable.
    pub async fn reserve(
        &self,
        scope: &Scope,
        budget: Nanos,
        id: &ReservationId,
        amount: Nanos,
        day: &Day,
        now: i64,
    ) -> Option<Decision> {
        let (hash, due) = self.keys(scope, day);
        let keep_until = self.keep_until(day);
        let (admitted, remaining, expired): (i64, String, u64) = self
            .store
            .run(|mut conn| async move {
                self.reserve
                    .key(hash)
                    .key(due)
                    .arg(id)
                    .arg(amount.0)
                    .arg(budget.0)
                    .arg(now)
                    .arg(now.saturating_add(self.ttl))
                    .arg(keep_until)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let answer = FoldedAnswer::read(admitted, &remaining, expired)?;
        Some(self.answer(answer))
    }

    /// Replaces reservation `id` (made in `scope` on `day`) with the `actual` cost.
    /// `None`: Redis unavailable (call again later: a repeat never counts twice).
    pub async fn settle(
        &self,
        scope: &Scope,
        id: &ReservationId,
        actual: Nanos,
        day: &Day,
        now: i64,
    ) -> Option<Settlement> {
        let (hash, due) = self.keys(scope, day);
        let keep_until = self.keep_until(day);
        let (outcome, expired): (i64, u64) = self
            .store
            .run(|mut conn| async move {
                self.settle
                    .key(hash)
                    .key(due)
                    .arg(id)
                    .arg(actual.0)
                    .arg(now)
                    .arg(now.saturating_add(self.ttl))
                    .arg(keep_until)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        self.note_expired(expired);
        Some(match outcome {
            1 => Settlement::Settled,
            2 => Settlement::ReplacedCharge,
            _ => Settlement::Unknown,
        })
    }

    /// Writes spend made during an outage ([`super::outage::Replay`]) to Redis: a
    /// reservation with no budget limit, then its settlement, on the same id, so a replay
    /// cut halfway can be made again without counting twice. `None`: Redis unavailable
    /// (give the replay back and try later).
    pub async fn replay(&self, replay: &Replay, now: i64) -> Option<()> {
        self.reserve(&replay.scope, Nanos::MAX, &replay.id, replay.reserved, &replay.day, now)
            .await?;
        self.settle(&replay.scope, &replay.id, replay.cost, &replay.day, now)
            .await?;
        Some(())
    }

    /// The scope's spend and open reservations on `day` (expired ones charged first).
    pub async fn spend(&self, scope: &Scope, day: &Day, now: i64) -> Option<Spend> {
        let (hash, due) = self.keys(scope, day);
        let (spent, open, expired): (String, String, u64) = self
            .store
            .run(|mut conn| async move { self.read.key(hash).key(due).arg(now).invoke_async(&mut conn).await })
            .await?;
        self.note_expired(expired);
        Some(Spend {
            spent: Nanos(spent.parse().ok()?),
            open: Nanos(open.parse().ok()?),
        })
    }

    fn note_expired(&self, count: u64) {
        if count > 0 {
            self.expired.fetch_add(count, Ordering::Relaxed);
            crate::metrics::budget_expired(count);
        }
    }

    /// Reservations charged in full on expiry, as seen by this instance's calls.
    pub fn expired_charged(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    fn keys(&self, scope: &Scope, day: &Day) -> (String, String) {
        let tag = scope.tag();
        let hash = self.store.key(&tag, &format!("budget:{}", day.key()));
        let due = format!("{hash}:due");
        (hash, due)
    }

    fn keep_until(&self, day: &Day) -> i64 {
        day.end.saturating_add(self.ttl).saturating_add(DAY_MARGIN_SECONDS)
    }
}
