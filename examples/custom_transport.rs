//! A transport written outside the crate, over a medium the crate knows nothing about: a tiny
//! TCP hub on 127.0.0.1 that relays newline-delimited JSON notices between every connected node.
//!
//! What it takes to meet the [`Transport`] contract:
//! - `subscribe` must be live when it returns: here each node's connection is registered with
//!   the hub before `connect` returns (the hub answers `ready` only after registering it), and
//!   subscriptions are local, so a subscription is live from the start.
//! - Fan-out to every local subscriber, with notices kept until polled: delegated to the crate's
//!   [`MemoryTransport`], used here as a local bus.
//! - After the connection drops, reconnect and tell every subscriber [`Notice::Resync`].
//!
//! Run it: `cargo run --example custom_transport`. `tests/custom_transport.rs` runs the transport
//! conformance suite against it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_dispatch::fsm::BrokerId;
use broker_dispatch::transport::{MemoryTransport, Notice, Subscription, Transport};
use broker_dispatch::TransportError;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Relays every line any node sends to every node (the sender included).
#[derive(Debug)]
pub struct TcpHub {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

type Peers = Arc<Mutex<Vec<(u64, OwnedWriteHalf)>>>;

impl TcpHub {
    /// Listens on a free port of 127.0.0.1.
    pub async fn bind() -> io::Result<TcpHub> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let peers: Peers = Arc::default();
        let accept = tokio::spawn(async move {
            let mut next_id = 0u64;
            while let Ok((stream, _)) = listener.accept().await {
                next_id += 1;
                let (reader, mut writer) = stream.into_split();
                {
                    // Registered before `ready`, so a node that saw `ready` hears everything after.
                    let mut peers = peers.lock().await;
                    if writer.write_all(b"ready\n").await.is_err() {
                        continue;
                    }
                    peers.push((next_id, writer));
                }
                tokio::spawn(relay(next_id, reader, Arc::clone(&peers)));
            }
        });
        Ok(TcpHub { addr, accept })
    }

    /// Where nodes connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpHub {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Forwards one node's lines to every node; when the node goes away, forgets it (which closes
/// the socket, so the node notices too).
async fn relay(id: u64, reader: OwnedReadHalf, peers: Peers) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut peers = peers.lock().await;
        let mut dead = Vec::new();
        for (peer, writer) in peers.iter_mut() {
            let sent = writer.write_all(format!("{line}\n").as_bytes()).await;
            if sent.is_err() {
                dead.push(*peer);
            }
        }
        peers.retain(|(peer, _)| !dead.contains(peer));
    }
    peers.lock().await.retain(|(peer, _)| *peer != id);
}

/// One node's transport: a connection to the [`TcpHub`], fanned out locally.
#[derive(Debug, Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bus: MemoryTransport,
    writer: Arc<Mutex<Option<OwnedWriteHalf>>>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        self.bus.close();
    }
}

/// Connects and waits for the hub's `ready`: from then on, this node hears every line.
async fn dial(hub: SocketAddr) -> io::Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf)> {
    let (reader, writer) = TcpStream::connect(hub).await?.into_split();
    let mut reader = BufReader::new(reader);
    let mut ready = String::new();
    reader.read_line(&mut ready).await?;
    if ready.trim_end() != "ready" {
        return Err(io::Error::other("the hub did not say ready"));
    }
    Ok((reader, writer))
}

impl TcpTransport {
    /// Joins the hub at `hub`.
    ///
    /// # Errors
    ///
    /// [`TransportError::Unavailable`] if the hub cannot be reached.
    pub async fn connect(hub: SocketAddr) -> Result<TcpTransport, TransportError> {
        let (reader, writer) = dial(hub)
            .await
            .map_err(|e| TransportError::Unavailable(Box::new(e)))?;
        let bus = MemoryTransport::new();
        let writer = Arc::new(Mutex::new(Some(writer)));
        let task = tokio::spawn(listen(hub, reader, bus.clone(), Arc::clone(&writer)));
        Ok(TcpTransport {
            inner: Arc::new(Inner {
                bus,
                writer,
                reader: task,
            }),
        })
    }

    /// Closes this node's connection as a network failure would; it reconnects by itself.
    pub async fn drop_connection(&self) {
        if let Some(mut writer) = self.inner.writer.lock().await.take() {
            let _ = writer.shutdown().await;
        }
    }
}

/// Reads notices until the connection ends, then reconnects and announces a resync; forever.
async fn listen(
    hub: SocketAddr,
    mut reader: BufReader<OwnedReadHalf>,
    bus: MemoryTransport,
    writer: Arc<Mutex<Option<OwnedWriteHalf>>>,
) {
    loop {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Notice>(&line) {
                Ok(notice) => {
                    if bus.publish(notice).await.is_err() {
                        return; // the transport was dropped
                    }
                }
                Err(e) => eprintln!("ignoring a line that is not a notice: {e}"),
            }
        }
        reader = loop {
            match dial(hub).await {
                Ok((r, w)) => {
                    *writer.lock().await = Some(w);
                    break r;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        bus.inject_resync();
    }
}

#[async_trait]
impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp-hub"
    }

    async fn subscribe(&self) -> Result<Subscription, TransportError> {
        self.inner.bus.subscribe().await
    }

    async fn publish(&self, notice: Notice) -> Result<(), TransportError> {
        let mut line =
            serde_json::to_string(&notice).map_err(|e| TransportError::Payload(e.to_string()))?;
        line.push('\n');
        let mut writer = self.inner.writer.lock().await;
        let w = writer
            .as_mut()
            .ok_or_else(|| TransportError::Unavailable("reconnecting to the hub".into()))?;
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| TransportError::Unavailable(Box::new(e)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hub = TcpHub::bind().await?;
    let a = TcpTransport::connect(hub.addr()).await?;
    let b = TcpTransport::connect(hub.addr()).await?;
    let mut on_b = b.subscribe().await?;
    let notice = Notice::Signal {
        broker: BrokerId::new("broker-7")?,
    };
    a.publish(notice.clone()).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), on_b.next()).await?;
    println!(
        "node a published {notice:?}; node b received {got:?} through {}",
        hub.addr()
    );
    Ok(())
}
