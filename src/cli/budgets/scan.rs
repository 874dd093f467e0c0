//! Reads one day's budget hashes from Redis for the `budgets` subcommand: every master
//! of a Redis Cluster, `SCAN` with `MATCH` and `COUNT` (never `KEYS`, which would stop a
//! busy node), then `spend` and `open` of each hash (`HMGET`, one pipeline per page).
//!
//! It only reads: it never charges expired reservations (`read.lua` does when the server
//! touches a scope), so a reservation past its time still counts as open here until then.
//! Memory is bounded by the number of keys it may read; its errors never hold the URL.

use std::collections::HashSet;

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Pipeline, RedisError, RedisResult, Value};

use crate::budget::Nanos;
use crate::settings::RedisSettings;
use crate::store::{self, Conn};

/// Keys asked of a node per `SCAN` call (a hint: Redis may answer more or fewer).
const SCAN_COUNT: usize = 1000;

/// One budget hash: the scope's hash tag and its figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub tag: String,
    pub spent: Nanos,
    pub open: Nanos,
}

/// What was read.
#[derive(Debug, Default)]
pub(super) struct DayRead {
    pub entries: Vec<Entry>,
    /// The scan stopped at the key limit: the list is incomplete.
    pub truncated: bool,
    /// Keys that matched but are not a budget hash this version writes (skipped).
    pub skipped: usize,
}

/// Reads every `<prefix>:{<tag>}:budget:<day>` hash, at most `max_keys` of them.
pub(super) async fn read_day(settings: &RedisSettings, day: &str, max_keys: usize) -> RedisResult<DayRead> {
    let conn = store::connect_once(settings).await?;
    let mut reader = Reader {
        head: format!("{}:{{", settings.prefix),
        tail: format!("}}:budget:{day}"),
        pattern: format!("{}:{{*}}:budget:{day}", glob_escape(&settings.prefix)),
        max_keys,
        seen: HashSet::new(),
        read: DayRead::default(),
    };
    match conn {
        single @ Conn::Single(_) => reader.scan(&mut Node::Single(single)).await?,
        Conn::Cluster(conn) => {
            for (host, port) in masters(&mut conn.clone()).await? {
                let mut node = Node::Cluster {
                    conn: conn.clone(),
                    host,
                    port,
                };
                reader.scan(&mut node).await?;
                if reader.read.truncated {
                    break;
                }
            }
        }
    }
    Ok(reader.read)
}

struct Reader {
    /// `<prefix>:{` and `}:budget:<day>`: what surrounds the tag in a key.
    head: String,
    tail: String,
    pattern: String,
    max_keys: usize,
    /// Keys already read: `SCAN` may return a key twice (while the table grows).
    seen: HashSet<String>,
    read: DayRead,
}

impl Reader {
    /// Scans one node to the end of its keyspace or to the key limit.
    async fn scan(&mut self, node: &mut Node) -> RedisResult<()> {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = node
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&self.pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT),
                )
                .await?;
            let mut fresh = Vec::with_capacity(keys.len());
            for key in keys {
                if self.seen.len() >= self.max_keys {
                    self.read.truncated = true;
                    break;
                }
                match String::from_utf8(key) {
                    Ok(key) if self.tag_of(&key).is_some() => {
                        if self.seen.insert(key.clone()) {
                            fresh.push(key);
                        }
                    }
                    _ => self.read.skipped += 1,
                }
            }
            self.figures(node, fresh).await?;
            // Cursor 0 ends a full iteration; the key limit ends it early.
            if next == 0 || self.read.truncated {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// `spend` and `open` of `keys`, in one pipeline.
    async fn figures(&mut self, node: &mut Node, keys: Vec<String>) -> RedisResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("HMGET").arg(key).arg("spend").arg("open");
        }
        let values = node.pipeline(&pipe, keys.len()).await?;
        for (key, value) in keys.iter().zip(values) {
            let (spent, open): (Option<String>, Option<String>) = redis::from_redis_value(value)?;
            if spent.is_none() && open.is_none() {
                // Expired (or removed) between the scan and the read: nothing to show.
                continue;
            }
            let amount = |field: Option<String>| field.map_or(Some(Nanos::ZERO), |v| v.parse().ok().map(Nanos));
            match (self.tag_of(key), amount(spent), amount(open)) {
                (Some(tag), Some(spent), Some(open)) => self.read.entries.push(Entry {
                    tag: tag.to_owned(),
                    spent,
                    open,
                }),
                _ => self.read.skipped += 1,
            }
        }
        Ok(())
    }

    /// The hash tag of a key of this day, if it is one (`MATCH` would also take a key
    /// whose prefix holds the glob's `*` part).
    fn tag_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let tag = key.strip_prefix(&self.head)?.strip_suffix(&self.tail)?;
        (!tag.contains(['{', '}'])).then_some(tag)
    }
}

/// Where commands go: the single node, or one master of a cluster by its address.
enum Node {
    Single(Conn),
    Cluster {
        conn: ClusterConnection,
        host: String,
        port: u16,
    },
}

impl Node {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Self::Single(conn) => cmd.query_async(conn).await,
            Self::Cluster { conn, host, port } => {
                let value = conn.route_command(cmd.clone(), Self::at(host, *port)).await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }

    async fn pipeline(&mut self, pipe: &Pipeline, count: usize) -> RedisResult<Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipe, 0, count).await,
            // The keys came from this node's own scan, so it holds their slots.
            Self::Cluster { conn, host, port } => {
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                conn.route_pipeline(pipe.clone(), 0, count, route).await
            }
        }
    }

    fn at(host: &str, port: u16) -> RoutingInfo {
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_owned(),
            port,
        })
    }
}

/// The masters of the cluster as the client knows them (`host`, `port`): a `PING` to all
/// masters answers one entry per node address.
async fn masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let answer = conn
        .route_command(
            redis::cmd("PING"),
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
        )
        .await?;
    let Value::Map(nodes) = answer else {
        return Err(unexpected("the cluster's masters"));
    };
    let mut masters = Vec::with_capacity(nodes.len());
    for (address, _) in nodes {
        let address: String = redis::from_redis_value(address)?;
        // `host:port`; an IPv6 host has colons of its own, the port never does.
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
            .ok_or_else(|| unexpected("a node address"))?;
        masters.push((host, port));
    }
    masters.sort();
    Ok(masters)
}

fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::Client, "unexpected answer", what.to_owned()))
}

/// `text` with Redis's glob characters escaped, so that a prefix matches only itself.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_with_glob_characters_matches_only_itself() {
        assert_eq!(glob_escape("api-key-server"), "api-key-server");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn only_keys_of_the_day_give_a_tag() {
        let reader = Reader {
            head: "pre:{".to_owned(),
            tail: "}:budget:2026-12-07".to_owned(),
            pattern: String::new(),
            max_keys: 1,
            seen: HashSet::new(),
            read: DayRead::default(),
        };
        assert_eq!(reader.tag_of("pre:{p:x61}:budget:2026-12-07"), Some("p:x61"));
        assert_eq!(reader.tag_of("pre:{p:x61}:budget:2026-12-07:due"), None);
        assert_eq!(reader.tag_of("pre:x:{p:x61}:budget:2026-12-07"), None);
        assert_eq!(reader.tag_of("pre:{a}:{b}:budget:2026-12-07"), None);
    }
}
