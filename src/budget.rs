//! Spend control: prices and amounts as integers ([`price`]), and the reservations that
//! admit a request only while its scope's budget can pay for its worst case ([`memory`]
//! on this instance, [`redis`] shared by every instance, [`outage`] while Redis is away).
//!
//! Nothing here reads the request or the response: the caller hands in the reservation
//! and the cost it measured ([`crate::usage`], [`price::cost`]). Money is integers of 1e-9
//! USD ([`Nanos`]), never floats. Time is unix seconds passed by the caller, so tests
//! control it and no background task is needed: expired reservations are charged lazily,
//! whenever their scope is touched.

pub mod admission;
pub mod memory;
pub mod outage;
pub mod price;
pub mod redis;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use self::price::Nanos;
use crate::store::id_part;

/// What a budget applies to (contract: "Scopes"). The names are the identity's shared
/// strings: a request's scopes cost no copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// (product, user): `DAILY_BUDGET_USD` or `PRODUCT_LIMITS[p].daily_budget_usd`.
    User { product: Arc<str>, user: Arc<str> },
    /// All users of a product: `PRODUCT_LIMITS[p].product_daily_budget_usd`.
    Product(Arc<str>),
    /// An HMAC client: `CLIENT_LIMITS[c].daily_budget_usd`.
    Client(Arc<str>),
}

impl Scope {
    /// `user`, `product` or `client`: the log line's `budget_scope` and the refusal's text.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::User { .. } => "user",
            Self::Product(_) => "product",
            Self::Client(_) => "client",
        }
    }

    /// The Redis hash tag of the scope. A user scope shares the tag of the limiter's
    /// (product, user) keys and a client scope the client's, so each identity's keys sit
    /// in one Redis Cluster slot; ids are escaped so none can break out of the tag.
    pub(crate) fn tag(&self) -> String {
        match self {
            Self::User { product, user } => format!("p:{}:u:{}", id_part(product), id_part(user)),
            Self::Product(product) => format!("p:{}", id_part(product)),
            Self::Client(client) => format!("c:{}", id_part(client)),
        }
    }
}

/// A reservation's id: unique to one request across all instances (an instance id and
/// a counter of its own), never the client's `x-request-id`, which a client may reuse.
/// Its text, `<instance>-<counter>[-<scope kind>]`, is written only where it leaves the
/// process (Redis); in memory it is compared and hashed as numbers.
#[derive(Clone, PartialEq, Eq)]
pub struct ReservationId {
    instance: Arc<str>,
    counter: u64,
    /// A request reserves in up to three scopes, and the outage ledger keys its
    /// reservations by id alone: each scope's reservation carries the scope's kind.
    kind: Option<&'static str>,
}

impl ReservationId {
    /// The id of this request's reservation in one kind of scope.
    #[must_use]
    pub fn in_scope(&self, scope: &Scope) -> Self {
        Self {
            kind: Some(scope.kind()),
            ..self.clone()
        }
    }
}

/// The counter and the kind tell this process's ids apart; equality still compares the
/// instance (ids of two instances meet in tests and in Redis replays).
impl Hash for ReservationId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.counter.hash(state);
        self.kind.hash(state);
    }
}

impl fmt::Debug for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.instance, self.counter)?;
        match self.kind {
            Some(kind) => write!(f, "-{kind}"),
            None => Ok(()),
        }
    }
}

/// Hands out [`ReservationId`]s: `<instance>-<counter>`, where the instance id is 64
/// random bits drawn at start (two instances, or one restarted, never share ids).
#[derive(Debug)]
pub struct ReservationIds {
    instance: Arc<str>,
    next: AtomicU64,
}

impl ReservationIds {
    /// A new instance id: 64 bits of the operating system's randomness, taken through
    /// the standard library's randomly keyed hasher. Not aws-lc's generator: its first
    /// use seeds it from CPU jitter, about 65 ms of work, which would have moved into
    /// every cold start; an instance id needs to be unique, not secret.
    pub fn new() -> Self {
        use std::hash::BuildHasher;
        let bits = std::collections::hash_map::RandomState::new().hash_one("reservation ids");
        Self::with_instance(&format!("{bits:016x}"))
    }

    /// Ids under a given instance id (tests, and instances that already have one).
    #[must_use]
    pub fn with_instance(instance: &str) -> Self {
        Self {
            instance: instance.into(),
            next: AtomicU64::new(0),
        }
    }

    /// The next id; never the same twice in this process.
    pub fn next(&self) -> ReservationId {
        ReservationId {
            instance: Arc::clone(&self.instance),
            counter: self.next.fetch_add(1, Ordering::Relaxed),
            kind: None,
        }
    }
}

impl Default for ReservationIds {
    fn default() -> Self {
        Self::new()
    }
}

/// One scope's answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Reserved. `remaining_before`: budget - spend - open reservations before this
    /// request, never below 0 (the `x-budget-remaining-usd` header).
    Admitted { remaining_before: Nanos },
    /// Not reserved: budget - spend - open reservations, never below 0.
    Refused { remaining: Nanos },
}

impl Decision {
    pub fn is_admitted(&self) -> bool {
        matches!(self, Self::Admitted { .. })
    }

    /// What was left before this request, either way.
    pub fn remaining(&self) -> Nanos {
        match *self {
            Self::Admitted { remaining_before } => remaining_before,
            Self::Refused { remaining } => remaining,
        }
    }
}

/// What a settlement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The open reservation was replaced by the actual cost.
    Settled,
    /// The reservation had expired and been charged in full; the actual cost replaced
    /// that charge.
    ReplacedCharge,
    /// Nothing to settle: already settled (a repeated call), or never reserved.
    Unknown,
}

/// A scope's figures for one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    /// Settled costs and expired reservations charged in full.
    pub spent: Nanos,
    /// Reservations still open.
    pub open: Nanos,
}

impl Spend {
    /// budget - spent - open, never below 0.
    pub fn remaining(&self, budget: Nanos) -> Nanos {
        budget.saturating_sub(self.spent.saturating_add(self.open))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_ids_are_unique_per_request_and_per_instance() {
        let a = ReservationIds::new();
        let b = ReservationIds::new();
        let first = a.next();
        assert_ne!(first, a.next());
        assert_ne!(first, b.next());
        let ids = ReservationIds::with_instance("i1");
        let id = ids.next();
        assert_eq!(id.to_string(), "i1-0");
        let scope = Scope::Product("p".into());
        assert_eq!(id.in_scope(&scope).to_string(), "i1-0-product");
        assert_ne!(id.in_scope(&scope), id);
        // Equal counters of two instances are two ids.
        assert_ne!(ReservationIds::with_instance("i2").next(), id);
    }

    #[test]
    fn scope_tags_cannot_collide_or_escape_the_hash_tag() {
        let user = Scope::User {
            product: "p".into(),
            user: "u}:{x".into(),
        };
        assert!(!user.tag().contains(['{', '}']));
        assert_ne!(Scope::Product("p".into()).tag(), Scope::Client("p".into()).tag());
        assert_eq!(user.kind(), "user");
    }
}
