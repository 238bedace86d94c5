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

#[tokio::test]
async fn upgrades_are_spliced_both_ways() {
    let upstream = upgrading_upstream().await;
    let gateway = TestGateway::start(&config_for(&format!("http://{upstream}/v1"), "")).await;

    let mut client = TcpStream::connect(gateway.addr).await.expect("connect");
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

    client.get_mut().write_all(b"ping realtime").await.expect("write upgraded");
    let mut echoed = [0u8; 13];
    client.read_exact(&mut echoed).await.expect("read upgraded");
    assert_eq!(&echoed, b"PING REALTIME");
}
