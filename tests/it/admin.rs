//! The admin listener: liveness and readiness.

use std::{sync::Arc, time::Duration};

use spillway::server::{Health, admin};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[tokio::test]
async fn healthz_is_200_and_readyz_turns_503_while_draining() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let health = Arc::new(Health::default());
    tokio::spawn(admin::serve(
        listener,
        health.clone(),
        None,
        Duration::from_secs(30),
        std::future::pending(),
    ));
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

#[tokio::test]
async fn a_head_that_never_finishes_is_cut_on_the_admin_port_too() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let health = Arc::new(Health::default());
    tokio::spawn(admin::serve(listener, health, None, Duration::from_millis(300), std::future::pending()));

    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.expect("half a head");
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the admin port kept a half-sent head open");
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before the timeout");
}
