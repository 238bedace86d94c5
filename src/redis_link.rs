//! The link to Redis in distributed mode: one multiplexed connection, whether it is
//! up, and the rule that no request waits on Redis longer than `[redis] timeout`.
//!
//! The shared limiter and the shared cache tier make their calls through
//! [`RedisLink::call`]. While the link is down a call fails at once with
//! [`Unavailable`] and the caller falls back to its local state; a call that errs or
//! outlasts the timeout marks the link down. A background probe (a `PING` a second)
//! marks it up again, so sharing resumes within about a second of Redis returning.
//! The connection manager reconnects by itself, and scripts are re-loaded on
//! `NOSCRIPT` by `redis::Script`. The change of state is logged once each way and
//! shown by the `spillway_redis_up` gauge and `/readyz`.

use std::{
    future::Future,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{
    RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use crate::{config::RedisConfig, error::StartupError, limit::Unavailable};

/// How often the probe pings Redis.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The gauge: 1 while Redis answers, 0 while the gateway runs on local state.
pub const UP_METRIC: &str = "spillway_redis_up";

/// A shared connection to Redis and its health. Cheap to share behind an `Arc`; the
/// probe stops when the last `Arc` is dropped.
pub struct RedisLink {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    up: AtomicBool,
    /// What the link was built from, to tell whether a reload needs a new one.
    config: RedisConfig,
}

impl RedisLink {
    /// A link for `config`, not yet connected: it starts down, and [`probe`] (called
    /// once at startup, then every [`PROBE_INTERVAL`] in the background) brings it up.
    ///
    /// [`probe`]: Self::probe
    pub fn new(config: &RedisConfig) -> Result<Arc<Self>, StartupError> {
        let invalid = |error: redis::RedisError| {
            // The error text may quote the URL, and with it the password.
            StartupError::Other(format!("[redis] url is not usable: {}", error.category()))
        };
        if config.url.expose().starts_with("rediss://") {
            // redis-rs builds its TLS config on rustls's process-wide provider; make it
            // ours (ring), whatever other crates in the build enable. Already set: fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(config.url.expose().as_str()).map_err(invalid)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_secs(1))))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(PROBE_INTERVAL);
        let connection = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(invalid)?;
        let link = Arc::new(Self {
            connection,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            up: AtomicBool::new(false),
            config: config.clone(),
        });
        metrics::gauge!(UP_METRIC).set(0.0);
        tokio::spawn(probe_forever(Arc::downgrade(&link)));
        Ok(link)
    }

    /// The namespace every key this process writes starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether Redis answered the last call or probe.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether this link still serves `config` (same server, namespace and timeout).
    pub fn serves(&self, config: &RedisConfig) -> bool {
        self.config.url.expose() == config.url.expose()
            && self.config.prefix == config.prefix
            && self.config.timeout == config.timeout
    }

    /// Runs one exchange with Redis within the timeout. Fails at once while the link
    /// is down; an error or a timeout marks it down.
    pub async fn call<T, F, Fut>(&self, exchange: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(Unavailable("redis is down".into()));
        }
        match tokio::time::timeout(self.timeout, exchange(self.connection.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) if !is_connection_error(&error) => {
                // Redis answered, with an error of the request's own (a script bug, a
                // wrong type): the link is fine.
                Err(Unavailable(format!("redis error: {}", error.category())))
            }
            Ok(Err(error)) => {
                self.mark_down(&format!("redis error: {}", error.category()));
                Err(Unavailable("redis is down".into()))
            }
            Err(_) => {
                self.mark_down(&format!("no answer within {:?}", self.timeout));
                Err(Unavailable("redis timed out".into()))
            }
        }
    }

    /// Pings Redis once and records the outcome. Awaited at startup so that a
    /// reachable Redis is shared from the first request.
    pub async fn probe(&self) {
        let mut connection = self.connection.clone();
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut connection);
        match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), ping).await {
            Ok(Ok(_)) => self.mark_up(),
            Ok(Err(error)) => self.mark_down(&format!("redis error: {}", error.category())),
            Err(_) => self.mark_down("no answer to PING"),
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("redis is up: limits and cache are shared across replicas");
            metrics::gauge!(UP_METRIC).set(1.0);
        }
    }

    fn mark_down(&self, reason: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                reason,
                "redis is unreachable: serving on local limits and cache until it returns"
            );
            metrics::gauge!(UP_METRIC).set(0.0);
        }
    }
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink").field("prefix", &self.prefix).field("up", &self.is_up()).finish()
    }
}

/// Whether an error says the connection, not the request, failed.
fn is_connection_error(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

/// Probes every [`PROBE_INTERVAL`] until the link is dropped.
async fn probe_forever(link: Weak<RedisLink>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(link) = link.upgrade() else { return };
        link.probe().await;
    }
}
