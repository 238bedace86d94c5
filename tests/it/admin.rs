//! The admin listener: liveness and readiness.

use std::sync::Arc;

use spillway::server::{Health, admin};
use tokio::net::TcpListener;

#[tokio::test]
async fn healthz_is_200_and_readyz_turns_503_while_draining() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let health = Arc::new(Health::default());
    tokio::spawn(admin::serve(listener, health.clone(), None, std::future::pending()));
    let get = |path: &str| reqwest::get(format!("http://{addr}{path}"));

    assert_eq!(get("/healthz").await.expect("answer").status(), 200);
    let ready = get("/readyz").await.expect("answer");
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.text().await.expect("body"), r#"{"status":"ready"}"#);

    health.start_draining();
    let draining = get("/readyz").await.expect("answer");
    assert_eq!(draining.status(), 503);
    assert_eq!(get("/healthz").await.expect("answer").status(), 200);
    assert_eq!(get("/nope").await.expect("answer").status(), 404);
}
