//! The link to Redis in distributed mode: two multiplexed connections (one for
//! limits, one for cache entries, so a large entry never queues in front of an
//! admission), whether Redis is up, and the rule that no request waits on one Redis
//! call longer than `[redis] timeout`.
//!
//! The shared limiter and the shared cache tier make their calls through
//! [`RedisLink::call`]. While the link is down a call fails at once with
//! [`Unavailable`] and the caller falls back to its local state; a limits call that
//! fails for want of a connection, or outlasts the timeout, marks the link down (a
//! slow cache call is only a miss). A background probe (a `PING` a second on the
//! limits connection, the first at once) judges the link too, and marks it up again
//! once Redis answers within the timeout, so sharing resumes within about a second of
//! Redis returning, and a Redis that answers but too slowly stays down instead of
//! flapping. The connection managers reconnect by themselves, and scripts are
//! re-loaded on `NOSCRIPT` by `redis::Script`. Each change of state (the first
//! probe's outcome included) is logged once and shown by the `spillway_redis_up`
//! gauge and `/readyz`.

use std::{
    future::Future,
    sync::{
        Arc, Weak,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use redis::{
    RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::time::Instant;

use crate::{config::RedisConfig, error::StartupError, limit::Unavailable};

/// How often the probe pings Redis.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The least time given to opening a connection (TCP, TLS, `AUTH`), whatever
/// `[redis] timeout` is: connecting happens in the background, never in a request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The gauge: 1 while Redis answers, 0 while the gateway runs on local state.
pub const UP_METRIC: &str = "spillway_redis_up";

/// Which of the link's connections a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Admissions, settlements and lease releases: small and latency-bound.
    Limits,
    /// Cache entries, which may be large.
    Cache,
}

/// What the link knows of Redis.
const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Shared connections to Redis and their health. Cheap to share behind an `Arc`; the
/// probe stops when the last `Arc` is dropped.
pub struct RedisLink {
    limits: ConnectionManager,
    cache: ConnectionManager,
    prefix: String,
    timeout: Duration,
    state: AtomicU8,
    /// What the link was built from, to tell whether a reload needs a new one.
    config: RedisConfig,
}

impl RedisLink {
    /// A link for `config`, not yet connected: [`probe`] (called once at startup,
    /// then every [`PROBE_INTERVAL`] in the background, the first time at once)
    /// brings it up.
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
        // No response timeout of redis-rs's own (500 ms by default): every call has its
        // own deadline here, and a cache write may take longer than a lookup.
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(config.timeout.max(CONNECT_TIMEOUT)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(PROBE_INTERVAL);
        let connect = |client: redis::Client| {
            ConnectionManager::new_lazy_with_config(client, manager_config.clone()).map_err(invalid)
        };
        let link = Arc::new(Self {
            limits: connect(client.clone())?,
            cache: connect(client)?,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            state: AtomicU8::new(UNKNOWN),
            config: config.clone(),
        });
        tokio::spawn(probe_forever(Arc::downgrade(&link)));
        Ok(link)
    }

    /// The namespace every key this process writes starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `[redis] timeout`: the longest a request waits on one Redis call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether Redis answered the last call or probe.
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// Whether this link still serves `config` (same server, namespace and timeout).
    pub fn serves(&self, config: &RedisConfig) -> bool {
        self.config.url.expose() == config.url.expose()
            && self.config.prefix == config.prefix
            && self.config.timeout == config.timeout
    }

    /// Runs one exchange with Redis on `lane` within the timeout. Fails at once while
    /// the link is down. On the limits lane a connection failure or a timeout marks
    /// the link down; the cache lane never does (a large entry may be slow, and it
    /// must not send admissions to local limits): the probe judges its health.
    pub async fn call<T, F, Fut>(&self, lane: Lane, exchange: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(Unavailable("redis is down".into()));
        }
        self.call_within(lane, self.timeout, lane == Lane::Limits, exchange).await
    }

    /// Runs one exchange whatever the link's state, within `timeout`, without
    /// changing the state: for work nobody waits on (a lease release, a cache
    /// write-behind) that should still be tried while the link is down.
    pub async fn call_in_background<T, F, Fut>(
        &self,
        lane: Lane,
        timeout: Duration,
        exchange: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call_within(lane, timeout, false, exchange).await
    }

    async fn call_within<T, F, Fut>(
        &self,
        lane: Lane,
        timeout: Duration,
        judges: bool,
        exchange: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let connection = match lane {
            Lane::Limits => self.limits.clone(),
            Lane::Cache => self.cache.clone(),
        };
        match tokio::time::timeout(timeout, exchange(connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) if !is_connection_error(&error) => {
                // Redis answered, with an error of the request's own (a script bug, a
                // wrong type): the link is fine.
                Err(Unavailable(format!("redis error: {}", error.category())))
            }
            Ok(Err(error)) => {
                if judges {
                    self.mark_down(&format!("redis error: {}", error.category()));
                }
                Err(Unavailable("redis is down".into()))
            }
            Err(_) => {
                if judges {
                    self.mark_down(&format!("no answer within {timeout:?}"));
                }
                Err(Unavailable("redis timed out".into()))
            }
        }
    }

    /// Pings Redis once on the limits connection and records the outcome: up only if
    /// it answers within the timeout (the first `PING` after a reconnect may take the
    /// longer connect time, so a slow one is asked again). The cache connection is
    /// not asked: writes queued on it must not make Redis look slow. Awaited at
    /// startup so that a reachable Redis is shared from the first request.
    pub async fn probe(&self) {
        let mut outcome = ping(&self.limits, self.timeout.max(CONNECT_TIMEOUT)).await;
        if matches!(outcome, Ok(took) if took > self.timeout) {
            outcome = ping(&self.limits, self.timeout).await;
        }
        match outcome {
            Ok(took) if took <= self.timeout => self.mark_up(),
            Ok(_) => self.mark_down(&format!("PING slower than {:?}", self.timeout)),
            Err(reason) => self.mark_down(&reason),
        }
    }

    fn mark_up(&self) {
        if self.state.swap(UP, Ordering::Relaxed) != UP {
            tracing::info!("redis is up: limits and cache are shared across replicas");
            metrics::gauge!(UP_METRIC).set(1.0);
        }
    }

    fn mark_down(&self, reason: &str) {
        if self.state.swap(DOWN, Ordering::Relaxed) != DOWN {
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

/// How long `connection` took to answer a `PING`, or why it did not within `timeout`.
async fn ping(connection: &ConnectionManager, timeout: Duration) -> Result<Duration, String> {
    let mut connection = connection.clone();
    let started = Instant::now();
    let ping = redis::cmd("PING");
    match tokio::time::timeout(timeout, ping.query_async::<String>(&mut connection)).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(error)) => Err(format!("redis error: {}", error.category())),
        Err(_) => Err(format!("no answer to PING within {timeout:?}")),
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

/// Probes at once, then every [`PROBE_INTERVAL`], until the link is dropped.
async fn probe_forever(link: Weak<RedisLink>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(link) = link.upgrade() else { return };
        link.probe().await;
    }
}
