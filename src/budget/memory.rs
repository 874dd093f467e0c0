//! Budgets kept in this instance's memory: without Redis (per instance, lost at restart,
//! as the contract says), and the model the Redis scripts follow.
//!
//! Per (day, scope): the spend (settled costs and expired reservations charged in full)
//! and the open reservations by id. Every step is repeatable on the reservation id: a
//! repeated reservation is answered again without being added, a repeated settlement
//! finds the settled marker and does nothing. Expired reservations are charged lazily,
//! when their scope is next touched, at the time the caller passes.
//!
//! Memory is bounded: at most `max_scopes` (day, scope) entries and `max_records`
//! reservations and settled markers. A new scope or reservation beyond either cap is not
//! admitted ([`StoreFull`]): spend control fails closed rather than forgetting spend.
//! Settled markers are forgotten `reservation_ttl` after settlement (a repeat after that
//! long is no retry), and a day's entries once no reservation of it can still be settled
//! (`reservation_ttl` + 1 hour after the day ends, as the Redis keys).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use super::{Decision, Nanos, ReservationId, Scope, Settlement, Spend};
use crate::day::Day;
use crate::lock::lock;

/// Default caps: about 100 MB at worst, far above what one instance sees in a day.
pub const DEFAULT_MAX_SCOPES: usize = 1_000_000;
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;
/// A day's entries are kept this long after the reservations' window (clock skew).
const DAY_MARGIN_SECONDS: i64 = 3600;

/// The cap on scopes or reservations is reached: the request is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the in-memory budget store is full")]
pub struct StoreFull;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// Counted in `open` until `expires_at`.
    Open { amount: u64, expires_at: i64 },
    /// Expired and charged in full (counted in `spend`); a late settlement replaces it.
    Charged { amount: u64 },
    /// Settled; remembered until `forget_at` so that a repeated call counts nothing.
    Settled { forget_at: i64 },
}

#[derive(Debug, Default)]
struct ScopeState {
    spend: u64,
    open: u64,
    records: HashMap<ReservationId, Record>,
    /// The earliest `expires_at`/`forget_at` among the records: no sweep before it.
    next_due: Option<i64>,
}

#[derive(Debug)]
struct DayState {
    /// The day's end, unix seconds.
    end: i64,
    scopes: HashMap<Scope, ScopeState>,
}

#[derive(Debug, Default)]
struct State {
    /// Keyed by the day's first instant: one zone's days never share it.
    days: BTreeMap<i64, DayState>,
    scopes: usize,
    records: usize,
}

/// See the module documentation.
#[derive(Debug)]
pub struct MemoryBudgets {
    state: Mutex<State>,
    ttl: i64,
    max_scopes: usize,
    max_records: usize,
    /// Keep settled markers (the model of the Redis scripts, whose calls may be repeated);
    /// off for the store admission uses without Redis, which settles each reservation
    /// exactly once in this process.
    keep_markers: bool,
}

impl MemoryBudgets {
    /// `reservation_ttl`: `BUDGET_RESERVATION_SECONDS`.
    pub fn new(reservation_ttl: Duration) -> Self {
        Self::with_caps(reservation_ttl, DEFAULT_MAX_SCOPES, DEFAULT_MAX_RECORDS)
    }

    pub fn with_caps(reservation_ttl: Duration, max_scopes: usize, max_records: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ttl: i64::try_from(reservation_ttl.as_secs()).unwrap_or(i64::MAX / 4),
            max_scopes,
            max_records,
            keep_markers: true,
        }
    }

    /// The store of an instance without Redis: each reservation is settled once, by this
    /// process, so a settled one is forgotten at once instead of being kept as a marker
    /// for `reservation_ttl` (at thousands of requests a second, markers would fill the
    /// caps within minutes and refuse every request).
    pub fn in_process(reservation_ttl: Duration) -> Self {
        Self {
            keep_markers: false,
            ..Self::new(reservation_ttl)
        }
    }

    /// Reserves `amount` for request `id` in `scope` on `day` if spend + open reservations
    /// + `amount` <= `budget`. Repeating it with the same id reserves nothing more.
    pub fn reserve(
        &self,
        scope: &Scope,
        budget: Nanos,
        id: &ReservationId,
        amount: Nanos,
        day: &Day,
        now: i64,
    ) -> Result<Decision, StoreFull> {
        let mut state = lock(&self.state);
        self.prune_days(&mut state, now);
        let State { days, scopes, records } = &mut *state;
        let day_state = days.entry(day.start).or_insert_with(|| DayState {
            end: day.end,
            scopes: HashMap::new(),
        });
        let scope_state = match day_state.scopes.entry(scope.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                if *scopes >= self.max_scopes {
                    return Err(StoreFull);
                }
                *scopes += 1;
                entry.insert(ScopeState::default())
            }
        };
        *records -= sweep(scope_state, now);
        let committed = scope_state.spend.saturating_add(scope_state.open);
        let record = match scope_state.records.entry(id.clone()) {
            Entry::Occupied(entry) => {
                let before = match entry.get() {
                    // A repeat: the answer it had, without this request's own amount.
                    Record::Open { amount: own, .. } | Record::Charged { amount: own } => {
                        committed.saturating_sub(*own)
                    }
                    Record::Settled { .. } => committed,
                };
                return Ok(Decision::Admitted {
                    remaining_before: budget.saturating_sub(Nanos(before)),
                });
            }
            Entry::Vacant(entry) => entry,
        };
        let remaining = budget.saturating_sub(Nanos(committed));
        if u128::from(committed) + u128::from(amount.0) > u128::from(budget.0) {
            return Ok(Decision::Refused { remaining });
        }
        if *records >= self.max_records {
            return Err(StoreFull);
        }
        let expires_at = now.saturating_add(self.ttl);
        record.insert(Record::Open {
            amount: amount.0,
            expires_at,
        });
        *records += 1;
        scope_state.open += amount.0;
        scope_state.next_due = Some(scope_state.next_due.map_or(expires_at, |d| d.min(expires_at)));
        Ok(Decision::Admitted {
            remaining_before: remaining,
        })
    }

    /// Replaces reservation `id` (made in `scope` on `day`) with the `actual` cost. A
    /// repeat, or an id never reserved, changes nothing.
    pub fn settle(&self, scope: &Scope, id: &ReservationId, actual: Nanos, day: &Day, now: i64) -> Settlement {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let Some(scope_state) = state.days.get_mut(&day.start).and_then(|d| d.scopes.get_mut(scope)) else {
            return Settlement::Unknown;
        };
        state.records -= sweep(scope_state, now);
        let forget_at = now.saturating_add(self.ttl);
        let Some(record) = scope_state.records.get_mut(id) else {
            return Settlement::Unknown;
        };
        let outcome = match *record {
            Record::Open { amount, .. } => {
                scope_state.open -= amount;
                Settlement::Settled
            }
            Record::Charged { amount } => {
                scope_state.spend -= amount;
                Settlement::ReplacedCharge
            }
            Record::Settled { .. } => return Settlement::Unknown,
        };
        scope_state.spend = scope_state.spend.saturating_add(actual.0).min(Nanos::MAX.0);
        if self.keep_markers {
            *record = Record::Settled { forget_at };
            scope_state.next_due = Some(scope_state.next_due.map_or(forget_at, |d| d.min(forget_at)));
        } else {
            scope_state.records.remove(id);
            state.records -= 1;
        }
        outcome
    }

    /// The scope's spend and open reservations on `day`, expired ones charged first.
    pub fn spend(&self, scope: &Scope, day: &Day, now: i64) -> Spend {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let Some(scope_state) = state.days.get_mut(&day.start).and_then(|d| d.scopes.get_mut(scope)) else {
            return Spend::default();
        };
        state.records -= sweep(scope_state, now);
        Spend {
            spent: Nanos(scope_state.spend),
            open: Nanos(scope_state.open),
        }
    }

    /// Reservations and settled markers held now (for tests and metrics).
    pub fn records(&self) -> usize {
        lock(&self.state).records
    }

    /// Forgets the days whose reservations can no longer be settled.
    fn prune_days(&self, state: &mut State, now: i64) {
        let horizon = self.ttl.saturating_add(DAY_MARGIN_SECONDS);
        let over: Vec<i64> = state
            .days
            .iter()
            .filter(|(_, d)| d.end.saturating_add(horizon) <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in over {
            if let Some(day) = state.days.remove(&key) {
                state.scopes -= day.scopes.len();
                state.records -= day.scopes.values().map(|s| s.records.len()).sum::<usize>();
            }
        }
    }
}

/// Charges the scope's expired reservations in full and forgets its old settled markers;
/// returns how many records were removed.
fn sweep(scope: &mut ScopeState, now: i64) -> usize {
    if scope.next_due.is_none_or(|due| due > now) {
        return 0;
    }
    let mut removed = 0;
    let mut next_due: Option<i64> = None;
    let mut charged = 0u64;
    let mut expired = 0u64;
    scope.records.retain(|_, record| match *record {
        Record::Open { amount, expires_at } if expires_at <= now => {
            charged += amount;
            expired += 1;
            *record = Record::Charged { amount };
            true
        }
        Record::Settled { forget_at } if forget_at <= now => {
            removed += 1;
            false
        }
        Record::Open { expires_at: due, .. } | Record::Settled { forget_at: due } => {
            next_due = Some(next_due.map_or(due, |d| d.min(due)));
            true
        }
        Record::Charged { .. } => true,
    });
    scope.open -= charged;
    scope.spend = scope.spend.saturating_add(charged).min(Nanos::MAX.0);
    if expired > 0 {
        crate::metrics::budget_expired(expired);
    }
    scope.next_due = next_due;
    removed
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::budget::ReservationIds;
    use crate::day::DayZone;

    const NOW: i64 = 1_796_601_600; // 2026-12-07T00:00:00Z
    const TTL: Duration = Duration::from_secs(3600);

    fn user() -> Scope {
        Scope::User {
            product: "p".into(),
            user: "u".into(),
        }
    }

    fn today() -> Day {
        DayZone::utc().day_at(NOW)
    }

    #[test]
    fn admits_only_while_spend_plus_open_plus_amount_fits_the_budget() {
        let store = MemoryBudgets::new(TTL);
        let ids = ReservationIds::with_instance("t");
        let budget = Nanos(100);
        let (a, b, c) = (ids.next(), ids.next(), ids.next());
        let day = today();
        assert_eq!(
            store.reserve(&user(), budget, &a, Nanos(60), &day, NOW),
            Ok(Decision::Admitted {
                remaining_before: Nanos(100)
            })
        );
        assert_eq!(
            store.reserve(&user(), budget, &b, Nanos(41), &day, NOW),
            Ok(Decision::Refused { remaining: Nanos(40) })
        );
        assert_eq!(
            store.reserve(&user(), budget, &b, Nanos(40), &day, NOW),
            Ok(Decision::Admitted {
                remaining_before: Nanos(40)
            })
        );
        // Settling frees what the reservation held beyond the actual cost.
        assert_eq!(store.settle(&user(), &a, Nanos(10), &day, NOW), Settlement::Settled);
        assert_eq!(
            store.spend(&user(), &day, NOW),
            Spend {
                spent: Nanos(10),
                open: Nanos(40)
            }
        );
        assert_eq!(
            store.reserve(&user(), budget, &c, Nanos(50), &day, NOW),
            Ok(Decision::Admitted {
                remaining_before: Nanos(50)
            })
        );
    }

    #[test]
    fn in_process_a_settled_reservation_is_forgotten_at_once() {
        let store = MemoryBudgets::in_process(TTL);
        let ids = ReservationIds::with_instance("t");
        let day = today();
        for _ in 0..10 {
            let id = ids.next();
            assert!(
                store
                    .reserve(&user(), Nanos(100), &id, Nanos(30), &day, NOW)
                    .unwrap()
                    .is_admitted()
            );
            assert_eq!(store.settle(&user(), &id, Nanos(1), &day, NOW), Settlement::Settled);
            assert_eq!(store.settle(&user(), &id, Nanos(1), &day, NOW), Settlement::Unknown);
        }
        assert_eq!(store.records(), 0);
        assert_eq!(store.spend(&user(), &day, NOW).spent, Nanos(10));
    }

    #[test]
    fn every_step_repeats_without_counting_twice() {
        let store = MemoryBudgets::new(TTL);
        let id = ReservationIds::with_instance("t").next();
        let day = today();
        let first = store.reserve(&user(), Nanos(100), &id, Nanos(30), &day, NOW);
        let again = store.reserve(&user(), Nanos(100), &id, Nanos(30), &day, NOW);
        assert_eq!(first, again);
        assert_eq!(store.spend(&user(), &day, NOW).open, Nanos(30));
        assert_eq!(store.settle(&user(), &id, Nanos(7), &day, NOW), Settlement::Settled);
        assert_eq!(store.settle(&user(), &id, Nanos(7), &day, NOW), Settlement::Unknown);
        assert_eq!(store.settle(&user(), &id, Nanos(9), &day, NOW), Settlement::Unknown);
        // A reservation repeated after its settlement adds nothing either.
        assert!(
            store
                .reserve(&user(), Nanos(100), &id, Nanos(30), &day, NOW)
                .unwrap()
                .is_admitted()
        );
        assert_eq!(
            store.spend(&user(), &day, NOW),
            Spend {
                spent: Nanos(7),
                open: Nanos(0)
            }
        );
    }

    #[test]
    fn an_unsettled_reservation_is_charged_in_full_after_the_ttl_and_a_late_settlement_replaces_it() {
        let store = MemoryBudgets::new(TTL);
        let id = ReservationIds::with_instance("t").next();
        let day = today();
        store.reserve(&user(), Nanos(100), &id, Nanos(30), &day, NOW).unwrap();
        let later = NOW + 3599;
        assert_eq!(
            store.spend(&user(), &day, later),
            Spend {
                spent: Nanos(0),
                open: Nanos(30)
            }
        );
        let expired = NOW + 3600;
        assert_eq!(
            store.spend(&user(), &day, expired),
            Spend {
                spent: Nanos(30),
                open: Nanos(0)
            }
        );
        // Charging is idempotent: looking again charges nothing more.
        assert_eq!(store.spend(&user(), &day, expired + 10).spent, Nanos(30));
        assert_eq!(
            store.settle(&user(), &id, Nanos(12), &day, expired + 20),
            Settlement::ReplacedCharge
        );
        assert_eq!(
            store.spend(&user(), &day, expired + 30),
            Spend {
                spent: Nanos(12),
                open: Nanos(0)
            }
        );
        assert_eq!(
            store.settle(&user(), &id, Nanos(12), &day, expired + 40),
            Settlement::Unknown
        );
    }

    #[test]
    fn scopes_and_days_are_separate() {
        let store = MemoryBudgets::new(TTL);
        let ids = ReservationIds::with_instance("t");
        let day = today();
        let tomorrow = DayZone::utc().day_at(day.end);
        store
            .reserve(&user(), Nanos(10), &ids.next(), Nanos(10), &day, NOW)
            .unwrap();
        let product = Scope::Product("p".into());
        assert!(
            store
                .reserve(&product, Nanos(10), &ids.next(), Nanos(10), &day, NOW)
                .unwrap()
                .is_admitted()
        );
        assert!(
            store
                .reserve(&user(), Nanos(10), &ids.next(), Nanos(10), &tomorrow, day.end)
                .unwrap()
                .is_admitted()
        );
        assert!(
            !store
                .reserve(&user(), Nanos(10), &ids.next(), Nanos(1), &day, NOW)
                .unwrap()
                .is_admitted()
        );
    }

    #[test]
    fn the_caps_refuse_new_scopes_and_reservations_and_old_days_are_forgotten() {
        let store = MemoryBudgets::with_caps(TTL, 2, 3);
        let ids = ReservationIds::with_instance("t");
        let day = today();
        let scope = |n: usize| Scope::Client(format!("c{n}").into());
        store
            .reserve(&scope(0), Nanos(100), &ids.next(), Nanos(1), &day, NOW)
            .unwrap();
        store
            .reserve(&scope(1), Nanos(100), &ids.next(), Nanos(1), &day, NOW)
            .unwrap();
        assert_eq!(
            store.reserve(&scope(2), Nanos(100), &ids.next(), Nanos(1), &day, NOW),
            Err(StoreFull)
        );
        store
            .reserve(&scope(1), Nanos(100), &ids.next(), Nanos(1), &day, NOW)
            .unwrap();
        assert_eq!(
            store.reserve(&scope(1), Nanos(100), &ids.next(), Nanos(1), &day, NOW),
            Err(StoreFull)
        );
        // A refusal by the budget is still a refusal, not StoreFull.
        assert_eq!(
            store.reserve(&scope(1), Nanos(2), &ids.next(), Nanos(1), &day, NOW),
            Ok(Decision::Refused { remaining: Nanos(0) })
        );
        // Once the day can no longer be settled, its entries go and room comes back.
        let much_later = day.end + 3600 + DAY_MARGIN_SECONDS;
        let next_day = DayZone::utc().day_at(much_later);
        assert!(
            store
                .reserve(&scope(2), Nanos(100), &ids.next(), Nanos(1), &next_day, much_later)
                .is_ok()
        );
        assert_eq!(store.records(), 1);
    }

    #[test]
    fn concurrent_reservations_from_many_threads_fill_the_budget_exactly() {
        let store = std::sync::Arc::new(MemoryBudgets::new(TTL));
        let ids = std::sync::Arc::new(ReservationIds::with_instance("t"));
        let day = today();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, ids) = (store.clone(), ids.clone());
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| {
                            store
                                .reserve(&user(), Nanos(1000), &ids.next(), Nanos(7), &day, NOW)
                                .unwrap()
                                .is_admitted()
                        })
                        .count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 142);
        assert_eq!(store.spend(&user(), &day, NOW).open, Nanos(994));
    }

    #[test]
    fn settled_markers_are_forgotten_after_the_ttl() {
        let store = MemoryBudgets::new(TTL);
        let ids = ReservationIds::with_instance("t");
        let day = today();
        for _ in 0..10 {
            let id = ids.next();
            store.reserve(&user(), Nanos(100), &id, Nanos(1), &day, NOW).unwrap();
            store.settle(&user(), &id, Nanos(1), &day, NOW);
        }
        assert_eq!(store.records(), 10);
        store.spend(&user(), &day, NOW + 3600);
        assert_eq!(store.records(), 0);
        assert_eq!(store.spend(&user(), &day, NOW + 3600).spent, Nanos(10));
    }

    /// (amount, reserved at, (cost, settled at) once settled)
    type Modelled = (u64, i64, Option<(u64, i64)>);

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(usize, u64),
        Settle(usize, u64),
        Wait(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..8, 0u64..60).prop_map(|(i, a)| Op::Reserve(i, a)),
            (0usize..8, 0u64..60).prop_map(|(i, a)| Op::Settle(i, a)),
            (0i64..2000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        /// Whatever the order of reservations, repeats, settlements and expiries: open
        /// reservations never exceed the budget at admission, and the spend is exactly the
        /// settled costs plus the expired, unsettled reservations.
        #[test]
        fn the_books_always_balance(ops in proptest::collection::vec(op(), 1..60)) {
            let store = MemoryBudgets::new(TTL);
            let ids: Vec<ReservationId> = {
                let maker = ReservationIds::with_instance("p");
                (0..8).map(|_| maker.next()).collect()
            };
            let day = today();
            let budget = Nanos(100);
            let mut now = NOW;
            // Model: id -> (amount, reserved_at, Some((cost, settled_at)) once settled);
            // costs of settled reservations whose marker was forgotten move to `past`.
            let mut model: HashMap<usize, Modelled> = HashMap::new();
            let mut past = 0;
            for op in ops {
                if let Op::Reserve(i, _) = op
                    && let Some((_, _, Some((cost, at)))) = model.get(&i).copied()
                    && at + 3600 <= now
                {
                    past += cost;
                    model.remove(&i);
                }
                match op {
                    Op::Reserve(i, amount) => {
                        let before = store.spend(&user(), &day, now);
                        let decision = store.reserve(&user(), budget, &ids[i], Nanos(amount), &day, now).unwrap();
                        if decision.is_admitted() {
                            if let std::collections::hash_map::Entry::Vacant(entry) = model.entry(i) {
                                prop_assert!(before.spent.0 + before.open.0 + amount <= budget.0);
                                entry.insert((amount, now, None));
                            }
                        } else {
                            prop_assert!(!model.contains_key(&i));
                            prop_assert!(before.spent.0 + before.open.0 + amount > budget.0);
                        }
                    }
                    Op::Settle(i, actual) => {
                        let outcome = store.settle(&user(), &ids[i], Nanos(actual), &day, now);
                        if let Some((_, _, settled @ None)) = model.get_mut(&i) {
                            prop_assert_ne!(outcome, Settlement::Unknown);
                            *settled = Some((actual, now));
                        } else {
                            prop_assert_eq!(outcome, Settlement::Unknown);
                        }
                    }
                    Op::Wait(s) => now += s,
                }
                let books = store.spend(&user(), &day, now);
                let mut spent = past;
                let mut open = 0;
                for (amount, at, settled) in model.values() {
                    match settled {
                        Some((cost, _)) => spent += cost,
                        None if *at + 3600 <= now => spent += amount,
                        None => open += amount,
                    }
                }
                prop_assert_eq!(books, Spend { spent: Nanos(spent), open: Nanos(open) });
            }
        }
    }
}
