//! Who owns which stored response: the upstream keeps every response under the product's
//! one key, so the proxy records, for each response created through it, its owner
//! (product, principal, user), and lets only that owner reach it again.
//!
//! Records live in Redis when it is configured (one key per response, under the owner's
//! hash tag, for 30 days), else in memory (at most [`MEMORY_CAPACITY`] ids, the oldest
//! forgotten first). While a configured Redis is unavailable, new records wait in memory
//! and are written to Redis by a later request once it answers; a lookup that memory
//! cannot answer then is [`ApiError::OwnershipUnavailable`], never a wrong 404. With Redis
//! available, answers come from Redis only, so no copy in memory outlives a `DELETE`
//! made through another instance.
//!
//! [`scan`] finds the id of a created response in the upstream's answer as it passes.

mod held;
pub mod scan;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::Response;
use http::header;

use self::scan::IdScanner;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::lock::lock;
use crate::store::{Store, id_part};

/// Most ids kept in memory.
pub const MEMORY_CAPACITY: usize = 1_000_000;
/// How long Redis keeps a record.
const RECORD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Records written back to Redis per request after an outage.
const FLUSH_BATCH: usize = 256;

/// The owner of a stored response. The principal is the HMAC client (`client: Some`) or
/// JWT (`None`): an HMAC client asserts its user ids, so its users are never a JWT user
/// or another client's user of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    product: Arc<str>,
    client: Option<Arc<str>>,
    user: Arc<str>,
}

impl Owner {
    pub fn of(identity: &Identity) -> Self {
        Self {
            product: Arc::clone(&identity.product),
            client: identity.client.clone(),
            user: Arc::clone(&identity.user),
        }
    }

    /// The owner's hash tag: `o:p:<product>:j:u:<user>` or `o:p:<product>:c:<client>:u:<user>`.
    fn tag(&self) -> String {
        let principal = match &self.client {
            None => "j".to_owned(),
            Some(client) => format!("c:{}", id_part(client)),
        };
        format!("o:p:{}:{principal}:u:{}", id_part(&self.product), id_part(&self.user))
    }
}

struct Entry {
    owner: Owner,
    /// Written during a Redis outage and not yet copied to Redis.
    pending: bool,
    /// The response's settled input and output tokens (its reservation's until settled).
    tokens: u64,
}

#[derive(Default)]
struct Memory {
    owners: HashMap<Arc<str>, Entry>,
    /// Insertion order, oldest first (ids removed since may linger until they reach the front).
    order: VecDeque<Arc<str>>,
    pending: VecDeque<Arc<str>>,
}

impl Memory {
    fn insert(&mut self, id: &str, owner: &Owner, pending: bool, tokens: u64) {
        while self.order.len() >= MEMORY_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.owners.remove(&oldest);
            }
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back(Arc::clone(&id));
        if pending {
            if self.pending.len() >= MEMORY_CAPACITY {
                self.pending.pop_front();
            }
            self.pending.push_back(Arc::clone(&id));
        }
        self.owners.insert(
            id,
            Entry {
                owner: owner.clone(),
                pending,
                tokens,
            },
        );
    }
}

/// The ownership records; see the module documentation.
pub struct Ownership {
    memory: Mutex<Memory>,
    redis: Option<Arc<Store>>,
}

impl Ownership {
    pub fn new(redis: Option<Arc<Store>>) -> Self {
        Self {
            memory: Mutex::default(),
            redis,
        }
    }

    /// Records `id` as `owner`'s. Never fails: while Redis is unavailable the record
    /// waits in memory. `tokens`: the response's input and output tokens as far as known (the reservation's
    /// until [`Ownership::set_tokens`] settles them).
    pub async fn record(&self, owner: &Owner, id: &str, tokens: u64) {
        if let Some(store) = &self.redis {
            // The record's value is the response's token count: what a request that
            // continues it (`previous_response_id`) reserves for it.
            let key = record_key(store, owner, id);
            let written = Box::pin(store.run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(tokens)
                    .arg("EX")
                    .arg(RECORD_TTL.as_secs())
                    .query_async::<()>(&mut conn)
                    .await
            }))
            .await;
            if written.is_some() {
                return;
            }
            lock(&self.memory).insert(id, owner, true, tokens);
            return;
        }
        lock(&self.memory).insert(id, owner, false, tokens);
    }

    /// Replaces the recorded token count of `id` with its settled one (the record keeps
    /// its lifetime; a record that is gone stays gone).
    pub async fn set_tokens(&self, owner: &Owner, id: &str, tokens: u64) {
        {
            let mut memory = lock(&self.memory);
            if let Some(entry) = memory.owners.get_mut(id).filter(|e| e.owner == *owner) {
                entry.tokens = tokens;
            }
        }
        if let Some(store) = &self.redis {
            let key = record_key(store, owner, id);
            let _ = Box::pin(store.run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(tokens)
                    .arg("XX")
                    .arg("KEEPTTL")
                    .query_async::<()>(&mut conn)
                    .await
            }))
            .await;
        }
    }

    /// Records the response created by a `2xx` answer for `owner` before the bytes that
    /// carry its id go on to the client; returns the answer and the id, if found.
    pub async fn record_created(&self, owner: &Owner, response: Response, tokens: u64) -> (Response, Option<String>) {
        let (parts, body) = response.into_parts();
        let stream = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let scanner = if stream { IdScanner::sse() } else { IdScanner::json() };
        let (body, id) = held::hold_until_id(body, scanner).await;
        if let Some(id) = &id {
            self.record(owner, id, tokens).await;
        }
        (Response::from_parts(parts, body), id)
    }

    /// `Ok` when `owner` owns `id`; else 404 `response_not_found`, or 503
    /// `ownership_unavailable` when Redis is unavailable and memory does not know `id`.
    pub async fn check(&self, owner: &Owner, id: &str) -> Result<u64, ApiError> {
        let memory_says = || {
            lock(&self.memory)
                .owners
                .get(id)
                .map(|entry| (entry.owner == *owner).then_some(entry.tokens))
        };
        let Some(store) = &self.redis else {
            return match memory_says() {
                Some(Some(tokens)) => Ok(tokens),
                _ => Err(ApiError::ResponseNotFound),
            };
        };
        self.flush(store).await;
        let key = record_key(store, owner, id);
        let recorded = Box::pin(store.run(|mut conn| async move {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(&mut conn)
                .await
        }))
        .await;
        match (recorded, memory_says()) {
            // An unreadable count (written by an older version: `0`) reserves nothing more.
            (Some(Some(tokens)), _) => Ok(tokens.parse().unwrap_or(0)),
            (_, Some(Some(tokens))) => Ok(tokens),
            (Some(None), _) | (None, Some(None)) => Err(ApiError::ResponseNotFound),
            (None, None) => Err(ApiError::OwnershipUnavailable),
        }
    }

    pub async fn remove(&self, owner: &Owner, id: &str) {
        {
            let mut memory = lock(&self.memory);
            if memory.owners.get(id).is_some_and(|e| e.owner == *owner) {
                memory.owners.remove(id);
            }
        }
        if let Some(store) = &self.redis {
            let key = record_key(store, owner, id);
            let _ = Box::pin(
                store.run(|mut conn| async move { redis::cmd("DEL").arg(&key).query_async::<()>(&mut conn).await }),
            )
            .await;
        }
    }

    /// Copies records written during an outage to Redis, a batch per call; on success
    /// they leave memory (Redis answers for them from then on).
    async fn flush(&self, store: &Store) {
        let batch: Vec<(Arc<str>, Owner, u64)> = {
            let mut memory = lock(&self.memory);
            let mut batch = Vec::new();
            while batch.len() < FLUSH_BATCH {
                let Some(id) = memory.pending.pop_front() else { break };
                if let Some(entry) = memory.owners.get(&id).filter(|e| e.pending) {
                    batch.push((Arc::clone(&id), entry.owner.clone(), entry.tokens));
                }
            }
            batch
        };
        if batch.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (id, owner, tokens) in &batch {
            pipe.cmd("SET")
                .arg(record_key(store, owner, id))
                .arg(*tokens)
                .arg("EX")
                .arg(RECORD_TTL.as_secs())
                .ignore();
        }
        let written = Box::pin(store.run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })).await;
        let mut memory = lock(&self.memory);
        for (id, _, _) in batch {
            if written.is_some() {
                if memory.owners.get(&id).is_some_and(|e| e.pending) {
                    memory.owners.remove(&id);
                }
            } else {
                memory.pending.push_back(id);
            }
        }
    }
}

/// `<prefix>:{<owner tag>}:resp:<id>`: another owner's key for the same id is another key.
fn record_key(store: &Store, owner: &Owner, id: &str) -> String {
    store.key(&owner.tag(), &format!("resp:{}", id_part(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(product: &str, client: Option<&str>, user: &str) -> Owner {
        Owner {
            product: product.into(),
            client: client.map(Into::into),
            user: user.into(),
        }
    }

    #[tokio::test]
    async fn in_memory_only_the_owner_finds_a_record() {
        let ownership = Ownership::new(None);
        let alice = owner("demo", None, "alice");
        ownership.record(&alice, "resp_1", 0).await;
        assert!(ownership.check(&alice, "resp_1").await.is_ok());
        for other in [
            owner("demo", None, "bob"),
            owner("demo", Some("desk"), "alice"),
            owner("other", None, "alice"),
        ] {
            assert!(matches!(
                ownership.check(&other, "resp_1").await,
                Err(ApiError::ResponseNotFound)
            ));
            ownership.remove(&other, "resp_1").await;
        }
        assert!(ownership.check(&alice, "resp_1").await.is_ok());
        ownership.remove(&alice, "resp_1").await;
        assert!(ownership.check(&alice, "resp_1").await.is_err());
    }

    #[test]
    fn memory_forgets_the_oldest_first_at_capacity() {
        let mut memory = Memory::default();
        let alice = owner("demo", None, "alice");
        for i in 0..=MEMORY_CAPACITY {
            memory.insert(&format!("r{i}"), &alice, false, 0);
        }
        assert_eq!(memory.owners.len(), MEMORY_CAPACITY);
        assert!(!memory.owners.contains_key("r0"));
        assert!(memory.owners.contains_key("r1"));
    }

    #[test]
    fn owner_tags_keep_principals_apart() {
        assert_ne!(owner("p", None, "u").tag(), owner("p", Some("j"), "u").tag());
        assert_ne!(owner("p", Some("c"), "u").tag(), owner("p", Some("d"), "u").tag());
    }
}
