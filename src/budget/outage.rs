//! The outage rule: what one instance may admit on its own while Redis is unavailable,
//! and the spend it owes Redis once it is back. A pure state machine (no I/O, no clock,
//! no lock): the caller feeds it what Redis said, the decisions it has to take alone, and
//! the time.
//!
//! Contract: a scope whose state this instance read from Redis within the last
//! [`FRESH_SECONDS`] admits up to `BUDGET_OUTAGE_SHARE` of what was left then (budget -
//! spend - open reservations, as last read); any other budgeted scope up to that share of
//! its budget. The allowance is fixed when the scope's first outage decision is taken and
//! holds until Redis is back (a snapshot that ages during the outage does not widen it).
//! Every reservation admitted here is replayed into Redis, on its day of admission, once
//! it is settled (or expired) and Redis answers: as a reservation with no budget limit and
//! its settlement, both on the same id, so a replay that is interrupted can be repeated
//! without counting twice.
//!
//! Bounded: snapshots, allowances and reservations awaiting replay are capped; at the
//! cap, new outage reservations are refused (spend control fails closed), and snapshots
//! are no longer taken (such scopes get the share of their budget).

use std::collections::HashMap;

use super::price::PriceError;
use super::{Decision, Nanos, ReservationId, Scope};
use crate::day::Day;

/// A snapshot read from Redis is fresh this long (contract: "within the last 60 s").
pub const FRESH_SECONDS: i64 = 60;
/// Caps on what the outage state holds.
pub const MAX_SNAPSHOTS: usize = 100_000;
pub const MAX_WINDOWS: usize = 100_000;
pub const MAX_PENDING: usize = 100_000;
pub const MAX_VOIDS: usize = 100_000;

const PPM: u64 = 1_000_000;

/// `BUDGET_OUTAGE_SHARE`, exactly, in millionths (0 < share <= 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(u64);

impl Share {
    /// Parses the share from its decimal text (`0.1`): more than 0, at most 1, at most 6
    /// decimals.
    pub fn parse(text: &str) -> Result<Self, PriceError> {
        let micros = super::price::Price::parse(text)?.micros_per_million();
        if micros == 0 {
            return Err(PriceError::NotPositive);
        }
        if micros > PPM {
            return Err(PriceError::TooLarge);
        }
        Ok(Self(micros))
    }

    /// The default, 0.1.
    pub fn default_share() -> Self {
        Self(100_000)
    }

    /// `amount` × share, rounded down.
    pub fn of(self, amount: Nanos) -> Nanos {
        let part = u128::from(amount.0) * u128::from(self.0) / u128::from(PPM);
        Nanos(u64::try_from(part).unwrap_or(u64::MAX))
    }
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    left: Nanos,
    at: i64,
}

/// One scope's outage allowance on one day.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// What this instance may admit in all during this outage.
    limit: Nanos,
    /// What the header shows as left: the snapshot's left, or the budget, minus `used`.
    base: Nanos,
    /// Reserved or settled during this outage.
    used: Nanos,
}

#[derive(Debug, Clone)]
struct Pending {
    scope: Scope,
    day: Day,
    reserved: Nanos,
    reserved_at: i64,
    /// Set once settled.
    cost: Option<Nanos>,
}

/// A reservation admitted during an outage, to be written to Redis: reserve `reserved`
/// under `id` with no budget limit, then settle it at `cost`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub scope: Scope,
    pub day: Day,
    pub id: ReservationId,
    pub reserved: Nanos,
    pub cost: Nanos,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Outage {
    share: Share,
    reservation_ttl: i64,
    snapshots: HashMap<(Scope, String), Snapshot>,
    windows: HashMap<(Scope, String), Window>,
    pending: HashMap<ReservationId, Pending>,
    /// Reservations of refused requests that Redis may still have made (their call did
    /// not answer in time, and may run later): replayed at cost 0, which releases them
    /// in whichever order the calls arrive.
    voids: Vec<Replay>,
}

impl Outage {
    /// `share`: `BUDGET_OUTAGE_SHARE`; `reservation_ttl_seconds`:
    /// `BUDGET_RESERVATION_SECONDS` (an outage reservation never settled is replayed at its
    /// full amount after it).
    pub fn new(share: Share, reservation_ttl_seconds: i64) -> Self {
        Self {
            share,
            reservation_ttl: reservation_ttl_seconds,
            snapshots: HashMap::new(),
            windows: HashMap::new(),
            pending: HashMap::new(),
            voids: Vec::new(),
        }
    }

    /// Redis answered for `scope` on `day`: `left` is budget - spend - open reservations
    /// after that decision.
    pub fn note_read(&mut self, scope: &Scope, day: &Day, left: Nanos, now: i64) {
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            self.snapshots.retain(|_, s| now - s.at <= FRESH_SECONDS);
        }
        let key = (scope.clone(), day.key());
        if self.snapshots.len() < MAX_SNAPSHOTS || self.snapshots.contains_key(&key) {
            self.snapshots.insert(key, Snapshot { left, at: now });
        }
    }

    /// Redis answers again: the outage allowances end (the next outage starts from new
    /// snapshots). Reservations awaiting replay stay until [`Outage::take_replays`].
    pub fn redis_back(&mut self) {
        self.windows.clear();
    }

    /// Decides a reservation while Redis is unavailable. Repeating it with the same id
    /// reserves nothing more.
    pub fn reserve(
        &mut self,
        scope: &Scope,
        budget: Nanos,
        id: &ReservationId,
        amount: Nanos,
        day: &Day,
        now: i64,
    ) -> Decision {
        let key = (scope.clone(), day.key());
        if self.pending.contains_key(id) {
            let base = self.windows.get(&key).map_or(Nanos::ZERO, |w| w.base);
            let used = self.windows.get(&key).map_or(Nanos::ZERO, |w| w.used);
            return Decision::Admitted {
                remaining_before: base.saturating_sub(used.saturating_sub(amount)),
            };
        }
        if !self.windows.contains_key(&key) {
            if self.windows.len() >= MAX_WINDOWS {
                return Decision::Refused { remaining: Nanos::ZERO };
            }
            let base = match self.snapshots.get(&key) {
                Some(s) if now - s.at <= FRESH_SECONDS => s.left,
                _ => budget,
            };
            self.windows.insert(
                key.clone(),
                Window {
                    limit: self.share.of(base),
                    base,
                    used: Nanos::ZERO,
                },
            );
        }
        let Some(window) = self.windows.get_mut(&key) else {
            return Decision::Refused { remaining: Nanos::ZERO };
        };
        let remaining = window.base.saturating_sub(window.used);
        let fits = u128::from(window.used.0) + u128::from(amount.0) <= u128::from(window.limit.0);
        if !fits || self.pending.len() >= MAX_PENDING {
            return Decision::Refused { remaining };
        }
        window.used = window.used.saturating_add(amount);
        self.pending.insert(
            id.clone(),
            Pending {
                scope: scope.clone(),
                day: *day,
                reserved: amount,
                reserved_at: now,
                cost: None,
            },
        );
        Decision::Admitted {
            remaining_before: remaining,
        }
    }

    /// A request this ledger refused in `scope`, whose Redis call for `id` may still run
    /// (it did not answer in time): its reservation is released in Redis once it answers
    /// (a reservation without limit and its settlement at 0; the settlement leaves the
    /// marker that makes a late call reserve nothing). Beyond [`MAX_VOIDS`] waiting, new
    /// ones are dropped: such a reservation, if it was made, is charged when it expires.
    pub fn void(&mut self, scope: &Scope, id: &ReservationId, amount: Nanos, day: &Day) {
        if self.voids.len() >= MAX_VOIDS || self.pending.contains_key(id) {
            return;
        }
        self.voids.push(Replay {
            scope: scope.clone(),
            day: *day,
            id: id.clone(),
            reserved: amount,
            cost: Nanos::ZERO,
        });
    }

    /// Settles a reservation made by [`Outage::reserve`]; false when `id` is not one (or
    /// was settled already).
    pub fn settle(&mut self, id: &ReservationId, cost: Nanos) -> bool {
        let Some(pending) = self.pending.get_mut(id) else {
            return false;
        };
        if pending.cost.is_some() {
            return false;
        }
        pending.cost = Some(cost);
        let key = (pending.scope.clone(), pending.day.key());
        if let Some(window) = self.windows.get_mut(&key) {
            window.used = window.used.saturating_sub(pending.reserved).saturating_add(cost);
        }
        true
    }

    /// True when `id` was reserved here during an outage and awaits replay.
    pub fn holds(&self, id: &ReservationId) -> bool {
        self.pending.contains_key(id)
    }

    /// Removes and returns what is ready to be written to Redis: settled reservations, and
    /// those unsettled past the reservation window (at their full amount). The caller
    /// replays each (reserve without limit, then settle, same id); one that fails is given
    /// back with [`Outage::give_back`].
    pub fn take_replays(&mut self, now: i64) -> Vec<Replay> {
        let voids = std::mem::take(&mut self.voids);
        let ready: Vec<ReservationId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.cost.is_some() || p.reserved_at.saturating_add(self.reservation_ttl) <= now)
            .map(|(id, _)| id.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|id| {
                let p = self.pending.remove(&id)?;
                Some(Replay {
                    cost: p.cost.unwrap_or(p.reserved),
                    scope: p.scope,
                    day: p.day,
                    id,
                    reserved: p.reserved,
                })
            })
            .chain(voids)
            .collect()
    }

    /// A replay that could not be written (Redis went away again): kept for the next try.
    pub fn give_back(&mut self, replay: Replay) {
        self.pending.insert(
            replay.id,
            Pending {
                scope: replay.scope,
                day: replay.day,
                reserved: replay.reserved,
                reserved_at: i64::MIN,
                cost: Some(replay.cost),
            },
        );
    }

    /// Whether anything waits to be written to Redis.
    pub fn awaits_replay(&self) -> bool {
        !self.pending.is_empty() || !self.voids.is_empty()
    }

    /// Spend held here and not yet in Redis (settled costs, open reservations in full):
    /// lost if the instance stops now, and logged as such.
    pub fn unreplayed(&self) -> Nanos {
        self.pending
            .values()
            .fold(Nanos::ZERO, |sum, p| sum.saturating_add(p.cost.unwrap_or(p.reserved)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::ReservationIds;
    use crate::day::DayZone;

    const NOW: i64 = 1_796_601_600;

    fn scope() -> Scope {
        Scope::Product("p".into())
    }

    fn day() -> Day {
        DayZone::utc().day_at(NOW)
    }

    #[test]
    fn the_share_is_read_exactly() {
        assert_eq!(Share::parse("0.1"), Ok(Share(100_000)));
        assert_eq!(Share::parse("1"), Ok(Share(PPM)));
        assert_eq!(Share::parse("0"), Err(PriceError::NotPositive));
        assert_eq!(Share::parse("1.5"), Err(PriceError::TooLarge));
        assert_eq!(Share::parse("0.0000001"), Err(PriceError::TooManyDecimals));
        assert_eq!(
            Share::parse("0.1").unwrap().of(Nanos(1_000_000_009)),
            Nanos(100_000_000)
        );
    }

    #[test]
    fn a_fresh_snapshot_admits_the_share_of_what_was_left() {
        let mut outage = Outage::new(Share::default_share(), 3600);
        let ids = ReservationIds::with_instance("o");
        outage.note_read(&scope(), &day(), Nanos(500), NOW);
        let at = NOW + FRESH_SECONDS;
        assert_eq!(
            outage.reserve(&scope(), Nanos(10_000), &ids.next(), Nanos(50), &day(), at),
            Decision::Admitted {
                remaining_before: Nanos(500)
            }
        );
        assert_eq!(
            outage.reserve(&scope(), Nanos(10_000), &ids.next(), Nanos(1), &day(), at),
            Decision::Refused { remaining: Nanos(450) }
        );
    }

    #[test]
    fn a_stale_or_missing_snapshot_admits_the_share_of_the_budget() {
        let mut outage = Outage::new(Share::default_share(), 3600);
        let ids = ReservationIds::with_instance("o");
        outage.note_read(&scope(), &day(), Nanos(500), NOW);
        let late = NOW + FRESH_SECONDS + 1;
        assert!(
            outage
                .reserve(&scope(), Nanos(10_000), &ids.next(), Nanos(1000), &day(), late)
                .is_admitted()
        );
        assert!(
            !outage
                .reserve(&scope(), Nanos(10_000), &ids.next(), Nanos(1), &day(), late)
                .is_admitted()
        );
        let other = Scope::Client("c".into());
        assert!(
            outage
                .reserve(&other, Nanos(100), &ids.next(), Nanos(10), &day(), NOW)
                .is_admitted()
        );
        assert!(
            !outage
                .reserve(&other, Nanos(100), &ids.next(), Nanos(1), &day(), NOW)
                .is_admitted()
        );
    }

    #[test]
    fn the_allowance_is_fixed_when_the_outage_first_decides() {
        let mut outage = Outage::new(Share::default_share(), 3600);
        let ids = ReservationIds::with_instance("o");
        outage.note_read(&scope(), &day(), Nanos(100), NOW);
        assert!(
            outage
                .reserve(&scope(), Nanos(10_000), &ids.next(), Nanos(10), &day(), NOW + 1)
                .is_admitted()
        );
        // Ten minutes on, the snapshot is stale, but the allowance does not grow to the
        // share of the whole budget.
        assert!(
            !outage
                .reserve(&scope(), Nanos(10_000), &ids.next(), Nanos(1), &day(), NOW + 600)
                .is_admitted()
        );
        // After Redis is back (and a new read), a new outage starts from the new snapshot.
        outage.redis_back();
        outage.note_read(&scope(), &day(), Nanos(80), NOW + 700);
        assert!(
            outage
                .reserve(&scope(), Nanos(10_000), &ids.next(), Nanos(8), &day(), NOW + 701)
                .is_admitted()
        );
    }

    #[test]
    fn settled_and_expired_reservations_are_replayed_once() {
        let mut outage = Outage::new(Share(PPM), 3600);
        let ids = ReservationIds::with_instance("o");
        let (a, b, c) = (ids.next(), ids.next(), ids.next());
        for id in [&a, &b, &c] {
            assert!(
                outage
                    .reserve(&scope(), Nanos(1000), id, Nanos(100), &day(), NOW)
                    .is_admitted()
            );
        }
        // A repeat is admitted without counting again.
        assert!(
            outage
                .reserve(&scope(), Nanos(1000), &a, Nanos(100), &day(), NOW)
                .is_admitted()
        );
        assert!(outage.settle(&a, Nanos(30)));
        assert!(!outage.settle(&a, Nanos(30)));
        assert!(!outage.settle(&ids.next(), Nanos(1)));
        assert_eq!(outage.unreplayed(), Nanos(230));
        outage.redis_back();
        let replays = outage.take_replays(NOW + 10);
        assert_eq!(
            replays,
            [Replay {
                scope: scope(),
                day: day(),
                id: a.clone(),
                reserved: Nanos(100),
                cost: Nanos(30)
            }]
        );
        assert!(outage.take_replays(NOW + 10).is_empty());
        // `b` settles after Redis is back; `c` never does and is replayed in full.
        assert!(outage.settle(&b, Nanos(7)));
        let mut later = outage.take_replays(NOW + 3600);
        later.sort_by_key(|r| r.cost);
        assert_eq!(
            later.iter().map(|r| (r.id.clone(), r.cost)).collect::<Vec<_>>(),
            [(b, Nanos(7)), (c.clone(), Nanos(100))]
        );
        assert_eq!(outage.unreplayed(), Nanos::ZERO);
        // A replay that failed is kept for the next try.
        outage.give_back(later.pop().unwrap());
        assert!(outage.holds(&c));
        assert_eq!(outage.take_replays(NOW + 3600).len(), 1);
    }

    #[test]
    fn settlement_during_the_outage_frees_the_allowance() {
        let mut outage = Outage::new(Share::default_share(), 3600);
        let ids = ReservationIds::with_instance("o");
        let first = ids.next();
        assert!(
            outage
                .reserve(&scope(), Nanos(1000), &first, Nanos(100), &day(), NOW)
                .is_admitted()
        );
        assert!(
            !outage
                .reserve(&scope(), Nanos(1000), &ids.next(), Nanos(50), &day(), NOW)
                .is_admitted()
        );
        outage.settle(&first, Nanos(40));
        assert!(
            outage
                .reserve(&scope(), Nanos(1000), &ids.next(), Nanos(60), &day(), NOW)
                .is_admitted()
        );
    }
}
