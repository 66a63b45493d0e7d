//! A TCP proxy that a test controls, put between the worker and a real
//! service (RabbitMQ, PostgreSQL, the SMTP sink) to inject network faults:
//! cut every open connection at once, make the service unreachable for a
//! while (new connections refused), let connections stall (accepted, but
//! nothing passes in either direction) until the stall is lifted, or stall
//! only the connections open now, for good, while new ones pass: a
//! half-open connection, which only the client's own timeouts (heartbeats)
//! can find out.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes pass both ways.
    Pass,
    /// New connections are closed as soon as they are accepted, and every
    /// open one is cut: the service looks unreachable.
    Down,
    /// Connections stay open, new ones are accepted, but no byte passes
    /// until the mode changes.
    Stall,
}

/// A proxy listening on a local port of its own, forwarding to `upstream`.
pub struct Proxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    cuts: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (state, watcher) = watch::channel(State {
            mode: Mode::Pass,
            cuts: 0,
            stalls: 0,
        });
        let connections = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_owned();
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay(client, upstream.clone(), watcher.clone()));
            }
        });
        Proxy {
            addr,
            state,
            cuts: Arc::new(AtomicU64::new(0)),
            connections,
            task,
        }
    }

    /// The port clients connect to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts every connection open now; new ones pass as before.
    pub fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.state.send_modify(|state| state.cuts += 1);
    }

    /// Sets what the proxy does from now on (`Down` also cuts what is open).
    pub fn set(&self, mode: Mode) {
        self.state.send_modify(|state| state.mode = mode);
    }

    /// Stalls every connection open now, for good (until it is cut or the
    /// proxy goes down); new ones pass as the mode says. Neither end is
    /// told: to both it looks like a peer that went silent.
    pub fn stall_open(&self) {
        self.state.send_modify(|state| state.stalls += 1);
    }

    /// What the proxy does now.
    pub fn mode(&self) -> Mode {
        self.state.borrow().mode
    }

    /// How many connections the proxy has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// How many times [`Proxy::cut`] was called.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Mode::Down);
    }
}

/// What the relays obey: the mode, and how many times the open connections
/// were cut or stalled (a relay born before a change obeys it).
#[derive(Clone, Copy, Debug)]
struct State {
    mode: Mode,
    cuts: u64,
    stalls: u64,
}

/// Relays one client connection until either side closes, the connection is
/// cut, or the proxy goes down.
async fn relay(client: TcpStream, upstream: String, mut state: watch::Receiver<State>) {
    let born = *state.borrow();
    if born.mode == Mode::Down {
        return;
    }
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let now = *state.borrow_and_update();
        if now.mode == Mode::Down || now.cuts != born.cuts {
            return;
        }
        if now.mode == Mode::Stall || now.stalls != born.stalls {
            if state.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            read = client_read.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if server_write.write_all(&up[..n]).await.is_err() { return },
            },
            read = server_read.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if client_write.write_all(&down[..n]).await.is_err() { return },
            },
        }
    }
}
