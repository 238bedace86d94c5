//! An upstream that answers every connection with fixed bytes, for what a real HTTP
//! server never sends: garbage, a close before the response head, a body cut into
//! frames at chosen points.
//!
//! ```ignore
//! let up = RawUpstream::start(vec![b"HTTP/1.1 200 OK\r\n".to_vec(), b"garbage".to_vec()]).await;
//! ```
//!
//! Each connection gets its request read, then the pieces written one by one with
//! [`PAUSE`] between them (so each arrives as a read, a body frame, of its own), and is
//! closed. Dropping the handle stops the server.

// Not every test uses every helper.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

/// The wait between two pieces.
pub const PAUSE: Duration = Duration::from_millis(50);

pub struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    server: JoinHandle<()>,
}

impl RawUpstream {
    /// Serves `pieces` to every connection on 127.0.0.1:0 (no pieces: closes at once).
    pub async fn start(pieces: Vec<Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw upstream");
        let addr = listener.local_addr().expect("raw upstream address");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                let pieces = pieces.clone();
                tokio::spawn(async move {
                    // The whole request, so that closing never resets what was sent.
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request_complete(&request) {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    for (i, piece) in pieces.iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(PAUSE).await;
                        }
                        if stream.write_all(piece).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, connections, server }
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Whether `request` holds a whole head and the `content-length` bytes it announces.
fn request_complete(request: &[u8]) -> bool {
    let Some(end) = request.windows(4).position(|window| window == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    request.len() >= end + 4 + length
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}
