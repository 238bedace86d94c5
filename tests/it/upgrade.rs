//! Protocol upgrades (WebSocket, as the Realtime API uses) are relayed both ways.

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

use crate::support::gateway::{TestGateway, config_for};

/// An upstream that switches protocols and then echoes every byte back upper-cased.
async fn upgrading_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let mut stream = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.expect("read head");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
        let reply = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
        stream.get_mut().write_all(reply.as_bytes()).await.expect("write 101");
        let mut buffer = [0u8; 64];
        loop {
            let read = stream.read(&mut buffer).await.unwrap_or(0);
            if read == 0 {
                break;
            }
            let upper = buffer[..read].to_ascii_uppercase();
            stream.get_mut().write_all(&upper).await.expect("echo");
        }
    });
    addr
}

/// Opens a WebSocket upgrade through the gateway at `addr`, past its 101 head.
async fn open_tunnel(addr: std::net::SocketAddr) -> BufReader<TcpStream> {
    let mut client = TcpStream::connect(addr).await.expect("connect");
    let request = "GET /v1/realtime?model=gpt-4o-realtime HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer sk-caller\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    client.write_all(request.as_bytes()).await.expect("send upgrade");
    let mut client = BufReader::new(client);
    let mut status = String::new();
    client.read_line(&mut status).await.expect("status line");
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        client.read_line(&mut line).await.expect("header");
        if line == "\r\n" {
            break;
        }
    }
    client
}

/// Sends `text` through the tunnel and checks it comes back upper-cased.
async fn echo(tunnel: &mut BufReader<TcpStream>, text: &str) {
    tunnel.get_mut().write_all(text.as_bytes()).await.expect("write upgraded");
    let mut echoed = vec![0u8; text.len()];
    tunnel.read_exact(&mut echoed).await.expect("read upgraded");
    assert_eq!(echoed, text.to_ascii_uppercase().into_bytes());
}

#[tokio::test]
async fn upgrades_are_spliced_both_ways() {
    let upstream = upgrading_upstream().await;
    let gateway = TestGateway::start(&config_for(&format!("http://{upstream}/v1"), "")).await;

    let mut tunnel = open_tunnel(gateway.addr).await;
    echo(&mut tunnel, "ping realtime").await;
}

#[tokio::test]
async fn a_tunnel_keeps_its_connection_slot_and_a_drain_waits_for_it() {
    let upstream = upgrading_upstream().await;
    let gateway = TestGateway::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nmax_connections = 1\nshutdown_grace = \"20s\"\n\n\
         [[upstreams]]\nname = \"mock\"\nbase_url = \"http://{upstream}/v1\"\n"
    ))
    .await;
    let addr = gateway.addr;
    let mut tunnel = open_tunnel(addr).await;

    // The tunnel still holds the one connection slot: another connection is closed.
    let mut other = TcpStream::connect(addr).await.expect("connect");
    let _ = other.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), other.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "served past max_connections: {}",
        String::from_utf8_lossy(&answer)
    );

    // A drain waits for the tunnel, which keeps working meanwhile.
    let stopping = tokio::spawn(gateway.stop());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "the drain did not wait for the tunnel");
    echo(&mut tunnel, "still open").await;
    drop(tunnel);
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("the drain ends once the tunnel closed")
        .expect("gateway task");
}
