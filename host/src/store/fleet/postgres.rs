//! The PostgreSQL backend of a fleet: two tables, every compare-and-set one
//! statement, announcements with `NOTIFY` on channel `reauth`.
//!
//! ```sql
//! CREATE TABLE reauth_leases (fleet text, name text, token text,
//!     fence bigint NOT NULL DEFAULT 0, expires_at timestamptz NOT NULL,
//!     holder text, PRIMARY KEY (fleet, name));
//! CREATE TABLE reauth_records (fleet text, name text, version bigint NOT NULL,
//!     tag text NOT NULL, data bytea NOT NULL, expires_at timestamptz,
//!     PRIMARY KEY (fleet, name));
//! ```
//!
//! The backend creates them on first use when they are missing (the role then
//! needs `CREATE` on the schema); otherwise an administrator creates them once
//! and grants `SELECT, INSERT, UPDATE, DELETE` on both (see the README). Records
//! are committed before a statement returns: provider state survives a crash of
//! PostgreSQL with its default `synchronous_commit = on`.

use super::{Acquired, BusStream, FleetBackend, Record, StoreError, StoreFuture};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_postgres::{Client, NoTls, Statement};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS reauth_leases (
    fleet text NOT NULL, name text NOT NULL, token text,
    fence bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity',
    holder text,
    PRIMARY KEY (fleet, name));
CREATE TABLE IF NOT EXISTS reauth_records (
    fleet text NOT NULL, name text NOT NULL, version bigint NOT NULL,
    tag text NOT NULL, data bytea NOT NULL, expires_at timestamptz,
    PRIMARY KEY (fleet, name));
";

/// Most connections one replica opens (besides its `LISTEN` connection).
const MAX_CONNECTIONS: usize = 8;

/// A fleet's data in PostgreSQL 15.
pub struct PostgresBackend {
    config: tokio_postgres::Config,
    fleet: String,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    slots: tokio::sync::Semaphore,
    schema_ready: AtomicBool,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("at", &self.describe())
            .finish_non_exhaustive()
    }
}

/// A pooled connection and its prepared statements.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    async fn statement(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

/// A connection taken from the pool; back to it when dropped, only if the
/// operation finished ([`Pooled::keep`]) and it is still open: one cut off by a
/// timeout may still have a statement running.
struct Pooled<'a> {
    backend: &'a PostgresBackend,
    conn: Option<Conn>,
    kept: bool,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

impl Pooled<'_> {
    /// The operation finished: the connection may serve the next one.
    fn keep(&mut self) {
        self.kept = true;
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("present until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.kept
            && !conn.client.is_closed()
        {
            self.backend
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        }
    }
}

impl PostgresBackend {
    /// A backend for fleet `fleet` at `url` (`postgres://user:password@host:port/db`
    /// or `host=… user=…`). Connects on first use; errors name the host, never
    /// the password. TLS is not supported: use loopback, a private network or a
    /// local TLS-terminating proxy.
    pub fn new(url: &str, fleet: &str, timeout: Duration) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|_| StoreError::Backend {
            what: "fleet.url".into(),
            detail: "not a PostgreSQL connection string".into(),
        })?;
        config.connect_timeout(timeout);
        config.application_name("reauth");
        // No statement or lock wait outlives the caller's bound on the server.
        let ms = timeout.as_millis().max(1);
        config.options(format!("-c statement_timeout={ms} -c lock_timeout={ms}"));
        Ok(PostgresBackend {
            config,
            fleet: fleet.to_string(),
            timeout,
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
            schema_ready: AtomicBool::new(false),
        })
    }

    fn error(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        let detail = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        StoreError::Backend {
            what: format!("{what} ({})", self.describe()),
            detail,
        }
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| self.error("connecting", &e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    async fn conn(&self) -> Result<Pooled<'_>, StoreError> {
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| StoreError::Backend {
                what: self.describe(),
                detail: "closed".into(),
            })?;
        let idle = loop {
            let next = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(conn) if conn.client.is_closed() => continue,
                other => break other,
            }
        };
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let client = self.connect().await?;
                if !self.schema_ready.load(Ordering::Relaxed) {
                    self.ensure_schema(&client).await?;
                    self.schema_ready.store(true, Ordering::Relaxed);
                }
                Conn {
                    client,
                    statements: HashMap::new(),
                }
            }
        };
        Ok(Pooled {
            backend: self,
            conn: Some(conn),
            kept: false,
            _slot: slot,
        })
    }

    /// Create the tables if they are missing (one replica at a time: an advisory
    /// lock), without needing `CREATE` when they exist.
    async fn ensure_schema(&self, client: &Client) -> Result<(), StoreError> {
        let missing: bool = client
            .query_one(
                "SELECT to_regclass('reauth_leases') IS NULL OR to_regclass('reauth_records') IS NULL",
                &[],
            )
            .await
            .map_err(|e| self.error("checking the tables", &e))?
            .get(0);
        if missing {
            client
                .batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock(7254021); {SCHEMA} COMMIT;"
                ))
                .await
                .map_err(|e| {
                    self.error("creating the tables reauth_leases and reauth_records", &e)
                })?;
        }
        Ok(())
    }
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl FleetBackend for PostgresBackend {
    fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .zip(
                self.config
                    .get_ports()
                    .iter()
                    .chain(std::iter::repeat(&5432)),
            )
            .map(|(h, port)| match h {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => format!("{}", p.display()),
            })
            .collect();
        format!(
            "postgres {}/{}",
            hosts.join(","),
            self.config.get_dbname().unwrap_or("")
        )
    }

    fn acquire<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<Option<Acquired>, StoreError>> {
        Box::pin(async move {
            const SQL: &str = "
WITH prev AS (SELECT holder FROM reauth_leases WHERE fleet = $1 AND name = $2)
INSERT INTO reauth_leases AS l (fleet, name, token, fence, expires_at, holder)
VALUES ($1, $2, $3, 1, clock_timestamp() + $4::bigint::float8 * interval '1 millisecond',
        NULLIF($5, '') || ' since=' || ((extract(epoch from clock_timestamp()) * 1000)::bigint)::text)
ON CONFLICT (fleet, name) DO UPDATE
    SET token = excluded.token, fence = l.fence + 1,
        expires_at = excluded.expires_at, holder = excluded.holder
    WHERE l.token IS NULL OR l.expires_at < clock_timestamp() OR l.token = excluded.token
RETURNING fence, (SELECT holder FROM prev),
    (extract(epoch from clock_timestamp()) * 1000)::bigint";
            let mut conn = self.conn().await?;
            let statement = conn
                .statement(SQL)
                .await
                .map_err(|e| self.error("taking a lease", &e))?;
            let row = conn
                .client
                .query_opt(
                    &statement,
                    &[&self.fleet, &name, &token, &as_i64(ttl_ms.max(1)), &holder],
                )
                .await
                .map_err(|e| self.error("taking a lease", &e))?;
            let acquired = match row {
                None => None,
                Some(row) => {
                    let bad = |e| self.error("taking a lease (unexpected column types)", &e);
                    Some(Acquired {
                        fence: u64::try_from(row.try_get::<_, i64>(0).map_err(bad)?).unwrap_or(0),
                        previous: row.try_get::<_, Option<String>>(1).map_err(bad)?,
                        now_ms: u64::try_from(row.try_get::<_, i64>(2).map_err(bad)?).unwrap_or(0),
                    })
                }
            };
            conn.keep();
            Ok(acquired)
        })
    }

    fn renew<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            const SQL: &str = "
UPDATE reauth_leases SET expires_at = clock_timestamp() + $4::bigint::float8 * interval '1 millisecond'
WHERE fleet = $1 AND name = $2 AND token = $3 AND expires_at > clock_timestamp()";
            let mut conn = self.conn().await?;
            let statement = conn
                .statement(SQL)
                .await
                .map_err(|e| self.error("renewing a lease", &e))?;
            let n = conn
                .client
                .execute(
                    &statement,
                    &[&self.fleet, &name, &token, &as_i64(ttl_ms.max(1))],
                )
                .await
                .map_err(|e| self.error("renewing a lease", &e))?;
            conn.keep();
            Ok(n == 1)
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        token: &'a str,
        leave: Option<&'a str>,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // The row stays (its fence keeps growing) until housekeeping
            // drops it an hour after its last use; a call cut off leaves its
            // record for the next holder.
            const SQL: &str = "
UPDATE reauth_leases SET token = NULL, expires_at = clock_timestamp(), holder = $4
WHERE fleet = $1 AND name = $2 AND token = $3";
            let mut conn = self.conn().await?;
            let statement = conn
                .statement(SQL)
                .await
                .map_err(|e| self.error("releasing a lease", &e))?;
            conn.client
                .execute(&statement, &[&self.fleet, &name, &token, &leave])
                .await
                .map_err(|e| self.error("releasing a lease", &e))?;
            conn.keep();
            Ok(())
        })
    }

    fn get<'a>(
        &'a self,
        name: &'a str,
    ) -> StoreFuture<'a, Result<(Option<Record>, u64), StoreError>> {
        Box::pin(async move {
            const SQL: &str = "
SELECT r.version, r.tag, r.data, (extract(epoch from n.t) * 1000)::bigint
FROM (SELECT clock_timestamp() AS t) n
LEFT JOIN reauth_records r ON r.fleet = $1 AND r.name = $2
    AND (r.expires_at IS NULL OR r.expires_at > n.t)";
            let mut conn = self.conn().await?;
            let statement = conn
                .statement(SQL)
                .await
                .map_err(|e| self.error("reading", &e))?;
            let row = conn
                .client
                .query_one(&statement, &[&self.fleet, &name])
                .await
                .map_err(|e| self.error("reading", &e))?;
            let bad = |e| self.error("reading (unexpected column types)", &e);
            let now_ms = u64::try_from(row.try_get::<_, i64>(3).map_err(bad)?).unwrap_or(0);
            let record = match row.try_get::<_, Option<i64>>(0).map_err(bad)? {
                None => None,
                Some(version) => Some(Record {
                    version: u64::try_from(version).unwrap_or(0),
                    tag: row.try_get(1).map_err(bad)?,
                    data: row.try_get(2).map_err(bad)?,
                }),
            };
            conn.keep();
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
            // The lease row is locked (FOR SHARE) for the statement: a replica
            // taking the lease over waits until this write is committed, and a
            // lapsed lease writes nothing.
            const SQL: &str = "
INSERT INTO reauth_records AS r (fleet, name, version, tag, data, expires_at)
SELECT $1, $2, $3, $4, $5,
    CASE WHEN $6::bigint > 0 THEN clock_timestamp() + $6::bigint::float8 * interval '1 millisecond' END
WHERE $7::text IS NULL OR EXISTS (
    SELECT 1 FROM reauth_leases
    WHERE fleet = $1 AND name = $7 AND token = $8 AND expires_at > clock_timestamp()
    FOR SHARE)
ON CONFLICT (fleet, name) DO UPDATE
    SET version = excluded.version, tag = excluded.tag, data = excluded.data,
        expires_at = excluded.expires_at";
            let mut conn = self.conn().await?;
            let statement = conn
                .statement(SQL)
                .await
                .map_err(|e| self.error("writing", &e))?;
            let (lease_name, token) = match lease {
                Some((l, t)) => (Some(l), Some(t)),
                None => (None, None),
            };
            let n = conn
                .client
                .execute(
                    &statement,
                    &[
                        &self.fleet,
                        &name,
                        &as_i64(record.version),
                        &record.tag,
                        &record.data,
                        &as_i64(ttl_ms),
                        &lease_name,
                        &token,
                    ],
                )
                .await
                .map_err(|e| self.error("writing", &e))?;
            conn.keep();
            Ok(n == 1)
        })
    }

    fn delete_if<'a>(
        &'a self,
        name: &'a str,
        tag: Option<&'a str>,
    ) -> StoreFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            const SQL: &str = "
DELETE FROM reauth_records WHERE fleet = $1 AND name = $2 AND ($3::text IS NULL OR tag = $3)";
            let mut conn = self.conn().await?;
            let statement = conn
                .statement(SQL)
                .await
                .map_err(|e| self.error("deleting", &e))?;
            let n = conn
                .client
                .execute(&statement, &[&self.fleet, &name, &tag])
                .await
                .map_err(|e| self.error("deleting", &e))?;
            conn.keep();
            Ok(n >= 1)
        })
    }

    fn publish<'a>(&'a self, message: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let payload = format!("{} {message}", self.fleet);
            conn.client
                .execute("SELECT pg_notify('reauth', $1)", &[&payload])
                .await
                .map_err(|e| self.error("announcing", &e))?;
            conn.keep();
            Ok(())
        })
    }

    fn subscribe<'a>(&'a self, inbox: &'a str) -> StoreFuture<'a, Result<BusStream, StoreError>> {
        Box::pin(async move {
            let (client, mut connection) = self
                .config
                .connect(NoTls)
                .await
                .map_err(|e| self.error("subscribing", &e))?;
            let (tx, rx) = tokio::sync::mpsc::channel::<String>(1024);
            let prefix = format!("{} ", self.fleet);
            tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                use futures_util::StreamExt;
                while let Some(Ok(message)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(n) = message
                        && let Some(rest) = n.payload().strip_prefix(&prefix)
                        && tx.send(rest.to_string()).await.is_err()
                    {
                        return;
                    }
                }
            });
            // The inbox is 16 hex digits (the caller's): a safe identifier.
            let inbox: String = inbox
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(16)
                .collect();
            let listen = format!("LISTEN reauth; LISTEN reauth_inbox_{inbox}");
            tokio::time::timeout(self.timeout, client.batch_execute(&listen))
                .await
                .map_err(|_| StoreError::Backend {
                    what: format!("subscribing ({})", self.describe()),
                    detail: "no answer in time".into(),
                })?
                .map_err(|e| self.error("subscribing", &e))?;
            // The client lives as long as the stream: dropping it would end the
            // connection.
            let stream =
                futures_util::stream::unfold((rx, client), |(mut rx, client)| async move {
                    let message = rx.recv().await?;
                    Some((message, (rx, client)))
                });
            Ok(Box::pin(stream) as BusStream)
        })
    }

    fn heartbeat<'a>(
        &'a self,
        inbox: &'a str,
        message: &'a str,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let inbox: String = inbox
                .chars()
                .filter(char::is_ascii_hexdigit)
                .take(16)
                .collect();
            let mut conn = self.conn().await?;
            let payload = format!("{} {message}", self.fleet);
            conn.client
                .execute(
                    "SELECT pg_notify('reauth_inbox_' || $1, $2)",
                    &[&inbox, &payload],
                )
                .await
                .map_err(|e| self.error("heartbeat", &e))?;
            conn.keep();
            Ok(())
        })
    }

    fn maintain(&self) -> StoreFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // Records long expired; lease rows released cleanly an hour ago,
            // and those left by holders that died or were cut off a week ago.
            const PURGE: &str = "DELETE FROM reauth_records WHERE fleet = $1 AND expires_at < clock_timestamp() - interval '1 minute'";
            const PURGE_LEASES: &str = "DELETE FROM reauth_leases WHERE fleet = $1 AND ((token IS NULL AND holder IS NULL AND expires_at < clock_timestamp() - interval '1 hour') OR expires_at < clock_timestamp() - interval '7 days')";
            let mut conn = self.conn().await?;
            for sql in [PURGE, PURGE_LEASES] {
                conn.client
                    .execute(sql, &[&self.fleet])
                    .await
                    .map_err(|e| self.error("housekeeping", &e))?;
            }
            conn.keep();
            Ok(())
        })
    }
}
