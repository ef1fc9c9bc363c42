//! The Redis backend of a fleet: one hash per record, a lease key with a
//! fencing counter, every compare-and-set a Lua script (atomic on the server),
//! announcements on one pub/sub channel per fleet (and one inbox per replica for
//! its heartbeat).
//!
//! Key schema (no secrets in names): `reauth:{<fleet>:<group>}:<kind>`, where
//! `<group>` is an entry id (a keyed hash) or `s.<provider>`, and `<kind>` is
//! `entry`, `failure`, `state`, `lease`, `fence` or `holder`. The braces are a
//! Redis Cluster hash tag: every key of one credential lives in one slot, so each
//! script touches one slot. The channels are `reauth:<fleet>:bus` and
//! `reauth:<fleet>:inbox:<replica>`. The ACL a fleet's
//! user needs is in the README ("Running a fleet"; tested by
//! `tests/it/fleet_store.rs`).

use super::{Acquired, BusStream, FleetBackend, Record, StoreError, StoreFuture};
use std::time::Duration;

const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  -- A retry of an acquire whose answer was lost.
  return {tonumber(redis.call('GET', KEYS[2]) or '0'), '', now}
end
if current then return false end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] == '' then
  -- A per-key lease: nothing kept beyond a few leases.
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) * 4)
  return {fence, '', now}
end
-- A provider state's lease: the holder record tells the next holder when this
-- one did not release it.
redis.call('PEXPIRE', KEYS[2], 604800000)
local prev = redis.call('GET', KEYS[3])
redis.call('SET', KEYS[3], ARGV[3] .. ' since=' .. now, 'PX', 604800000)
return {fence, prev or '', now}
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '' then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], ARGV[2], 'PX', 604800000) end
  return 1
end
return 0
";

const GET: &str = r"
local v = redis.call('HMGET', KEYS[1], 'v', 't', 'd')
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if not v[1] or not v[3] then return {now} end
return {now, v[1], v[2] or '', v[3]}
";

const PUT: &str = r"
if #KEYS > 1 and redis.call('GET', KEYS[2]) ~= ARGV[5] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 't', ARGV[2], 'd', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
";

const DELETE_IF: &str = r"
if ARGV[1] == '' or redis.call('HGET', KEYS[1], 't') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A fleet's data in Redis 7: a single server (or a primary with replicas), or
/// a Redis Cluster ([`RedisBackend::cluster`]). Put `appendonly yes` with
/// `appendfsync everysec` (or `always`) on it: provider state (a rotating
/// refresh token) written to a server that loses it on restart is a lost login.
pub struct RedisBackend {
    /// The server (for a cluster: the first seed node, which also carries the
    /// bus: cluster pub/sub reaches every node).
    client: redis::Client,
    cluster: Option<(redis::cluster::ClusterClient, Vec<String>)>,
    /// A client per cluster seed node (the bus moves to the next when one fails).
    node_clients: Vec<redis::Client>,
    bus_node: std::sync::atomic::AtomicUsize,
    fleet: String,
    timeout: Duration,
    conn: tokio::sync::OnceCell<Conn>,
    scripts: Scripts,
}

/// A connection to a single server or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

struct Scripts {
    acquire: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    get: redis::Script,
    put: redis::Script,
    delete_if: redis::Script,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("at", &self.describe())
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend for fleet `fleet` at `url` (`redis://[user:password@]host:port[/db]`).
    /// Connects on first use; the error names the URL's host, never its password.
    pub fn new(url: &str, fleet: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Backend {
            what: "fleet.url".into(),
            detail: format!("not a Redis URL: {}", e.category()),
        })?;
        Ok(RedisBackend {
            client,
            cluster: None,
            node_clients: Vec::new(),
            bus_node: std::sync::atomic::AtomicUsize::new(0),
            fleet: fleet.to_string(),
            timeout,
            conn: tokio::sync::OnceCell::new(),
            scripts: Scripts {
                acquire: redis::Script::new(ACQUIRE),
                renew: redis::Script::new(RENEW),
                release: redis::Script::new(RELEASE),
                get: redis::Script::new(GET),
                put: redis::Script::new(PUT),
                delete_if: redis::Script::new(DELETE_IF),
            },
        })
    }

    /// A backend for fleet `fleet` on the Redis Cluster reached through `nodes`
    /// (seed URLs; the rest of the cluster is discovered). Every script touches
    /// the keys of one credential, which share a hash slot.
    pub fn cluster(nodes: &[&str], fleet: &str, timeout: Duration) -> Result<Self, StoreError> {
        let first = nodes.first().ok_or_else(|| StoreError::Backend {
            what: "fleet.url".into(),
            detail: "no cluster node".into(),
        })?;
        let mut backend = RedisBackend::new(first, fleet, timeout)?;
        let cluster = redis::cluster::ClusterClient::builder(nodes.iter().map(|n| n.to_string()))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .build()
            .map_err(|e| StoreError::Backend {
                what: "fleet.url".into(),
                detail: format!("not a list of Redis URLs: {}", e.category()),
            })?;
        backend.node_clients = nodes
            .iter()
            .filter_map(|n| redis::Client::open(*n).ok())
            .collect();
        let described = backend
            .node_clients
            .iter()
            .map(|c| c.get_connection_info().addr.to_string())
            .collect();
        backend.cluster = Some((cluster, described));
        Ok(backend)
    }

    /// `<group>:<kind>` as a key: `reauth:{<fleet>:<group>}:<kind>`.
    fn key(&self, name: &str) -> String {
        let (group, kind) = name.rsplit_once(':').unwrap_or((name, "value"));
        format!("reauth:{{{}:{group}}}:{kind}", self.fleet)
    }

    fn channel(&self) -> String {
        format!("reauth:{}:bus", self.fleet)
    }

    fn inbox_channel(&self, inbox: &str) -> String {
        format!("reauth:{}:inbox:{inbox}", self.fleet)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                if let Some((cluster, _)) = &self.cluster {
                    return cluster.get_async_connection().await.map(Conn::Cluster);
                }
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                self.client
                    .get_connection_manager_with_config(config)
                    .await
                    .map(Conn::Single)
            })
            .await
            .map_err(|e| self.error("connecting", &e))?;
        Ok(conn.clone())
    }

    fn error(&self, what: &str, e: &redis::RedisError) -> StoreError {
        // The error's text can quote the URL; say what kind of failure it was
        // and where, never more.
        let detail = if e.is_connection_refusal() {
            "connection refused".to_string()
        } else if e.is_connection_dropped() {
            "connection dropped".to_string()
        } else if e.is_timeout() {
            "timed out".to_string()
        } else {
            match e.detail() {
                Some(detail) => format!("{}: {detail}", e.category()),
                None => e.category().to_string(),
            }
        };
        StoreError::Backend {
            what: format!("{what} ({})", self.describe()),
            detail,
        }
    }
}

fn parse_u64(value: &redis::Value) -> Option<u64> {
    match value {
        redis::Value::Int(n) => u64::try_from(*n).ok(),
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        redis::Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(value: &redis::Value) -> Option<Vec<u8>> {
    match value {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

impl FleetBackend for RedisBackend {
    fn describe(&self) -> String {
        match &self.cluster {
            Some((_, nodes)) => format!("redis cluster {}", nodes.join(",")),
            None => format!("redis {}", self.client.get_connection_info().addr),
        }
    }

    fn acquire<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<Option<Acquired>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let group = name.strip_suffix(":lease").unwrap_or(name);
            let value: redis::Value = self
                .scripts
                .acquire
                .key(self.key(name))
                .key(self.key(&format!("{group}:fence")))
                .key(self.key(&format!("{group}:holder")))
                .arg(token)
                .arg(ttl_ms.max(1))
                .arg(holder)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.error("taking a lease", &e))?;
            let redis::Value::Array(items) = value else {
                return Ok(None);
            };
            let fence = items.first().and_then(parse_u64).unwrap_or(0);
            let previous = items
                .get(1)
                .and_then(bytes)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .filter(|s| !s.is_empty());
            let now_ms = items.get(2).and_then(parse_u64).unwrap_or(0);
            Ok(Some(Acquired {
                fence,
                previous,
                now_ms,
            }))
        })
    }

    fn renew<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let renewed: i64 = self
                .scripts
                .renew
                .key(self.key(name))
                .arg(token)
                .arg(ttl_ms.max(1))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.error("renewing a lease", &e))?;
            Ok(renewed == 1)
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        leave: Option<&'a str>,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let group = name.strip_suffix(":lease").unwrap_or(name);
            let _: i64 = self
                .scripts
                .release
                .key(self.key(name))
                .key(self.key(&format!("{group}:holder")))
                .arg(token)
                .arg(leave.unwrap_or(""))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.error("releasing a lease", &e))?;
            Ok(())
        })
    }

    fn get<'a>(
        &'a self,
        name: &'a str,
    ) -> StoreFuture<'a, Result<(Option<Record>, u64), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let items: Vec<redis::Value> = self
                .scripts
                .get
                .key(self.key(name))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.error("reading", &e))?;
            let now_ms = items.first().and_then(parse_u64).unwrap_or(0);
            let record = match (items.get(1), items.get(2), items.get(3)) {
                (Some(v), Some(t), Some(d)) => Some(Record {
                    version: parse_u64(v).unwrap_or(0),
                    tag: bytes(t)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default(),
                    data: bytes(d).unwrap_or_default(),
                }),
                _ => None,
            };
            Ok((record, now_ms))
        })
    }

    fn put<'a>(
        &'a self,
        name: &'a str,
        record: &'a Record,
        ttl_ms: u64,
        lease: Option<(&'a str, &'a str)>,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let mut call = self.scripts.put.key(self.key(name));
            if let Some((lease, _)) = lease {
                call.key(self.key(lease));
            }
            let written: i64 = call
                .arg(record.version)
                .arg(&record.tag)
                .arg(&record.data[..])
                .arg(ttl_ms)
                .arg(lease.map_or("", |(_, token)| token))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.error("writing", &e))?;
            Ok(written == 1)
        })
    }

    fn delete_if<'a>(
        &'a self,
        name: &'a str,
        tag: Option<&'a str>,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let deleted: i64 = self
                .scripts
                .delete_if
                .key(self.key(name))
                .arg(tag.unwrap_or(""))
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.error("deleting", &e))?;
            Ok(deleted == 1)
        })
    }

    fn publish<'a>(&'a self, message: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let _: i64 = redis::cmd("PUBLISH")
                .arg(self.channel())
                .arg(message)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("announcing", &e))?;
            Ok(())
        })
    }

    fn subscribe<'a>(&'a self, inbox: &'a str) -> StoreFuture<'a, Result<BusStream, StoreError>> {
        Box::pin(async move {
            use futures_util::StreamExt;
            // On a cluster, a node that is down is skipped: each attempt tries
            // the next seed (pub/sub reaches every node of a cluster).
            let client = match &self.cluster {
                Some((_, nodes)) if !nodes.is_empty() => {
                    let i = self
                        .bus_node
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        % nodes.len();
                    self.node_clients.get(i).unwrap_or(&self.client)
                }
                _ => &self.client,
            };
            let mut pubsub = client
                .get_async_pubsub()
                .await
                .map_err(|e| self.error("subscribing", &e))?;
            pubsub
                .subscribe(&[self.channel(), self.inbox_channel(inbox)][..])
                .await
                .map_err(|e| self.error("subscribing", &e))?;
            let stream = pubsub
                .into_on_message()
                .map(|msg| msg.get_payload::<String>().unwrap_or_default());
            Ok(Box::pin(stream) as BusStream)
        })
    }

    fn heartbeat<'a>(
        &'a self,
        inbox: &'a str,
        message: &'a str,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let _: i64 = redis::cmd("PUBLISH")
                .arg(self.inbox_channel(inbox))
                .arg(message)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("heartbeat", &e))?;
            Ok(())
        })
    }
}
