//! The listeners: the gateway's own (HTTP/1.1 and h2c, or TLS with ALPN) and the admin
//! one, with graceful shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown future (mini-redis's shape), so
//! tests run the gateway in-process on `127.0.0.1:0`. When `shutdown` resolves it
//! stops accepting, lets connections in flight finish within `server.shutdown_grace`,
//! and returns.

use std::{future::Future, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{config::Overrides, runtime::Runtime};

pub mod admin;
mod connection;
mod framing;
pub mod reload;
mod tls;

pub use admin::Health;
pub use reload::Live;

/// Keepalive probes on client connections: a peer gone without a word (a tunnel's
/// client that lost power) is found out after about 90 s and its slot freed.
const TCP_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(3);

/// How long a client may take to finish a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the gateway on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: TcpListener,
    runtime: Arc<Runtime>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::error::StartupError> {
    serve_live(listener, Arc::new(Live::new(runtime)), shutdown).await
}

/// [`serve`], with the request path taken from `live` per request, so a reload
/// applies to the next request on every connection.
pub async fn serve_live(
    listener: TcpListener,
    live: Arc<Live>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), crate::error::StartupError> {
    let runtime = live.runtime();
    let tls = match &runtime.config.server.tls {
        Some(files) => Some(TlsAcceptor::from(tls::server_config(files)?)),
        None => None,
    };
    let server = &runtime.config.server;
    let grace = server.shutdown_grace;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(server.max_header_size.as_usize().max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_size.as_u64()).unwrap_or(u32::MAX));
    let max_connections = server.max_connections.get();
    let (header_read_timeout, idle_timeout) = (server.header_read_timeout, server.idle_timeout);
    // A connection holds a slot while it lives: the cap, and what draining waits for.
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections as usize));
    drop(runtime);
    let (stop, stopped) = tokio::sync::watch::channel(false);

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let deadlines = connection::Deadlines {
            first_head: tokio::time::Instant::now() + header_read_timeout,
            idle_timeout,
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            // Over `max_connections`: closed at once, before any byte is read.
            tracing::debug!(%peer, "connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        if let Err(error) = socket2::SockRef::from(&stream).set_tcp_keepalive(&TCP_KEEPALIVE) {
            tracing::debug!(%error, %peer, "could not set TCP keepalive");
        }
        let (builder, live, stopped) = (builder.clone(), live.clone(), stopped.clone());
        match &tls {
            None => {
                tokio::spawn(connection::serve(builder, stream, slot, live, stopped, deadlines, peer));
            }
            Some(acceptor) => {
                let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                tokio::spawn(async move {
                    let stream = match handshake.await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => return tracing::debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    connection::serve(builder, stream, slot, live, stopped, deadlines, peer).await;
                });
            }
        }
    }

    drop(listener);
    tracing::info!(grace = ?grace, "draining connections");
    let _ = stop.send(true);
    tokio::select! {
        _ = connections.acquire_many(max_connections) => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("shutdown grace period over; closing the rest"),
    }
    Ok(())
}

/// Runs the gateway for the `serve` command: binds both listeners, logs the startup
/// line, reloads on SIGHUP, serves until SIGTERM or SIGINT, then drains (a second
/// signal exits at once).
pub async fn run(
    config: crate::config::Config,
    overrides: Overrides,
) -> Result<(), crate::error::StartupError> {
    use crate::error::StartupError;

    // Before anything records a metric (the Redis link sets its gauge when built).
    // Without an admin listener nobody can read them, so none are recorded.
    let metrics = config.server.admin_listen.and_then(|_| crate::metrics::install());
    let runtime = Arc::new(Runtime::new(config)?);
    if runtime.config.default_limits.tokens_per_minute.is_some()
        || runtime.config.keys.iter().any(|key| key.limits.tokens_per_minute.is_some())
    {
        // Load the BPE tables now, not on the first limited request.
        crate::openai::tokens::warm_up();
    }
    let server = &runtime.config.server;
    let bind = |addr| async move {
        TcpListener::bind(addr).await.map_err(|source| StartupError::Bind { addr, source })
    };
    let listener = bind(server.listen).await?;
    let admin = match server.admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().and_then(|admin| admin.local_addr().ok());
    if let Some(link) = &runtime.redis {
        // A reachable Redis is shared from the first request on.
        link.probe().await;
    }
    let source = runtime.config.source.clone();
    let live = Arc::new(Live::new(runtime));
    let health = Arc::new(Health::new(live.clone()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(admin) = admin {
        let mut stopped = stopped.clone();
        let header_read_timeout = live.runtime().config.server.header_read_timeout;
        tokio::spawn(admin::serve(admin, health.clone(), metrics, header_read_timeout, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
    }
    // Every signal is handled from before the startup line on, so a supervisor that
    // signals right after it is never met by a default action (SIGHUP would kill).
    let mut signals = ShutdownSignals::install()?;
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|error| StartupError::Other(format!("cannot handle SIGHUP: {error}")))?;
    log_startup(&live.runtime(), &listener, admin_addr);

    let health_on_signal = health.clone();
    let shutdown = async move {
        signals.recv().await;
        tracing::info!("shutdown requested; draining (send the signal again to exit at once)");
        health_on_signal.start_draining();
        tokio::spawn(async move {
            signals.recv().await;
            tracing::warn!("second shutdown signal; exiting now");
            crate::telemetry::flush();
            std::process::exit(0);
        });
    };
    if let Some(path) = source.clone() {
        tokio::spawn(reload::on_file_change(live.clone(), path, overrides.clone()));
    }
    tokio::spawn(reload::on_sighup(hangups, live.clone(), source, overrides));
    let served = serve_live(listener, live, shutdown).await;
    let _ = stop.send(true);
    // The last requests' settlements, lease releases and cache writes, bounded.
    crate::background::finish(BACKGROUND_AT_EXIT).await;
    served
}

/// How long the process waits at exit for background work still under way.
const BACKGROUND_AT_EXIT: Duration = Duration::from_secs(1);

/// The one startup line: where it listens (as bound, so port 0 shows the real port),
/// what it forwards to, and which backends it runs.
fn log_startup(runtime: &Runtime, listener: &TcpListener, admin: Option<std::net::SocketAddr>) {
    let config = &runtime.config;
    let listen =
        listener.local_addr().map_or_else(|_| config.server.listen.to_string(), |addr| addr.to_string());
    let (shared_limits, shared_cache) =
        config.redis.as_ref().map_or((false, false), |redis| (redis.limits, redis.cache));
    let upstreams: Vec<String> =
        config.upstreams.iter().map(|upstream| format!("{}={}", upstream.name, upstream.base_url)).collect();
    tracing::info!(
        listen = %listen,
        admin = %admin.map_or("off".into(), |addr| addr.to_string()),
        tls = config.server.tls.is_some(),
        upstreams = %upstreams.join(","),
        auth = ?config.auth,
        keys = runtime.keys.len(),
        cache = match (&runtime.cache, shared_cache) {
            (None, _) => "off",
            (Some(_), false) => "memory",
            (Some(_), true) => "memory+redis",
        },
        limiter = if shared_limits { "redis" } else { "memory" },
        version = env!("CARGO_PKG_VERSION"),
        "spillway started"
    );
}

/// SIGTERM and SIGINT, listened for from the moment this is made (before the startup
/// line, so a supervisor that signals right after it is never ignored).
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self, crate::error::StartupError> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind| {
            signal(kind)
                .map_err(|error| crate::error::StartupError::Other(format!("cannot handle signals: {error}")))
        };
        Ok(Self {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
