//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process
//! runs), `/readyz` (200 while serving, 503 while draining, with a short JSON detail
//! that includes the Redis link's state in distributed mode).

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::Live;

/// Whether the gateway is taking traffic, shared by the main and admin listeners,
/// and the request path in service (for the state of its Redis link).
#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
    live: Option<Arc<Live>>,
}

impl Health {
    /// Health for the gateway serving `live`.
    pub fn new(live: Arc<Live>) -> Self {
        Self { draining: AtomicBool::new(false), live: Some(live) }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// `/readyz`'s status and JSON detail: 503 while draining; otherwise 200, with the
    /// Redis link's state in distributed mode (`degraded` still serves, on local state).
    fn readiness(&self) -> (StatusCode, &'static str) {
        let redis =
            self.live.as_ref().and_then(|live| live.runtime().redis.as_ref().map(|link| link.is_up()));
        match (self.is_draining(), redis) {
            (true, _) => (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#),
            (false, None) => (StatusCode::OK, r#"{"status":"ready"}"#),
            (false, Some(true)) => (StatusCode::OK, r#"{"status":"ready","redis":"ok"}"#),
            (false, Some(false)) => (StatusCode::OK, r#"{"status":"ready","redis":"degraded"}"#),
        }
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("draining", &self.is_draining()).finish_non_exhaustive()
    }
}

/// The longest an admin connection stays open; scrapers and probes reconnect.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
    header_read_timeout: std::time::Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The probes' port gets the main listener's slowloris bound too.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        let service = hyper::service::service_fn(move |request| {
            let response = route(&request, &health, metrics.as_ref());
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::spawn(async move {
            // A probe or a scrape takes milliseconds: a connection that lingers (one
            // that never sends a byte, say) is closed, however it behaves.
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(error)) => tracing::debug!(%error, "admin connection ended with an error"),
                Ok(Ok(())) => {}
                Err(_) => tracing::debug!("admin connection closed after {CONNECTION_LIFETIME:?}"),
            }
        });
    }
}

fn route(
    request: &Request<Incoming>,
    health: &Health,
    metrics: Option<&PrometheusHandle>,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => match metrics {
            Some(handle) => {
                crate::metrics::runtime_tasks();
                (StatusCode::OK, "text/plain; version=0.0.4", Bytes::from(handle.render()))
            }
            None => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"metrics are not recorded\n")),
        },
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" => {
            let (status, detail) = health.readiness();
            (status, "application/json", Bytes::from_static(detail.as_bytes()))
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"not found\n")),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}
