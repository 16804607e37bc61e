//! A TCP proxy between the supervisor and the broker, so that tests can cut
//! every connection or black-hole them (open but silent).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

struct State {
    upstream: String,
    blackhole: AtomicBool,
    refuse: AtomicBool,
    accepted: AtomicUsize,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (any free port) and forwards to `upstream` ("host:port").
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            upstream: upstream.to_owned(),
            blackhole: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if s.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s2 = s.clone();
                let handle = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&s2.upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, s2.clone()), pipe(sr, cw, s2.clone()));
                });
                s.tasks.lock().unwrap().push(handle.abort_handle());
            }
        });
        Proxy {
            port,
            state,
            accept,
        }
    }

    /// Closes every proxied connection now.
    pub fn cut(&self) {
        for t in self.state.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Stops forwarding bytes (connections stay open) until called with false.
    pub fn blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::SeqCst);
    }

    /// Refuses new connections (the broker looks down).
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }

    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if state.blackhole.load(Ordering::SeqCst) {
            // Swallow the bytes: the peer sees an open but silent connection.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// "host:port" of the broker in `AMQP_URL`.
pub fn broker_addr() -> String {
    let url = super::amqp_url();
    let rest = url.split("://").nth(1).unwrap_or("127.0.0.1:5672");
    let authority = rest.split('/').next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("127.0.0.1:5672");
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    }
}

/// `AMQP_URL` rewritten to go through the proxy on `port`.
pub fn url_via(port: u16) -> String {
    let url = super::amqp_url();
    url.replace(&broker_addr(), &format!("127.0.0.1:{port}"))
        .replace("@localhost/", &format!("@127.0.0.1:{port}/"))
}
