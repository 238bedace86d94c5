//! A real `redis-server` for distributed-mode tests: a child process on a free
//! loopback port, nothing saved to disk, stopped and started again on the same port
//! to play an outage.
//!
//! Without `redis-server` on the PATH a test is skipped with a note, except when `CI`
//! is set: there it fails (`.ci/run` installs it).

// A blocking helper on the wall clock: it waits for a child process, which no tokio
// clock (paused or not) governs, and is never used under a paused clock.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "waits on a child process in real time"
)]

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server, or `None` (with a note) when `redis-server` is missing and
    /// `CI` is not set.
    pub fn start() -> Option<Self> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is not installed; .ci/run installs it (apt-get install redis-server)"
            );
            eprintln!("note: redis-server not found; skipping a distributed-mode test");
            return None;
        }
        // A port free a moment ago may be taken before the server binds it (by another
        // test's server, even): then try another.
        for _ in 0..5 {
            let port =
                TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let mut server = Self { port, child: None };
            if server.try_resume() {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A `[redis]` section for this server with `prefix`.
    pub fn section(&self, prefix: &str) -> String {
        format!("[redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\ntimeout = \"250ms\"\n", self.url())
    }

    /// Kills the server (an outage); its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server in its tracks (SIGSTOP): connections stay open, and commands
    /// sent meanwhile run when it [`thaw`](Self::thaw)s, with no data lost.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().map(Child::id).expect("redis-server is running");
        let sent = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
        assert!(sent.is_ok_and(|status| status.success()), "kill -{name} redis-server");
    }

    /// Starts the server again on the same port and waits until it answers.
    pub fn resume(&mut self) {
        assert!(self.try_resume(), "redis-server did not answer on port {}", self.port);
    }

    /// Starts the server on this port; true once this very process answers there
    /// (checked by pid, so a test never talks to another test's server), false if it
    /// exited (the port was taken) or did not answer within 10 s.
    fn try_resume(&mut self) -> bool {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.answering_pid() == Some(pid) {
                return true;
            }
            let exited = self.child.as_mut().is_none_or(|child| !matches!(child.try_wait(), Ok(None)));
            if exited || Instant::now() > deadline {
                self.stop();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a redis-cli-like command through a raw connection; the reply as text.
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        // QUIT after it: Redis answers both, then closes, so reading to the end gets
        // the whole reply however large.
        request.push_str("*1\r\n$4\r\nQUIT\r\n");
        stream.write_all(request.as_bytes()).expect("write to redis");
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).expect("read from redis");
        let reply = String::from_utf8_lossy(&reply).into_owned();
        reply.strip_suffix("+OK\r\n").map(str::to_owned).unwrap_or(reply)
    }

    /// The `process_id` of whatever Redis answers on this port, if one does.
    fn answering_pid(&self) -> Option<u32> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        stream.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").ok()?;
        let mut reply = vec![0u8; 16 * 1024];
        let n = stream.read(&mut reply).ok()?;
        let reply = String::from_utf8_lossy(&reply[..n]);
        reply
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
